-- The table existing upstream deployments already have (SPEC.md). rawtransfer works
-- with it unchanged after `raw-transfer db upgrade`, which adds the extra columns
-- (state, error, sizes, hashes, claim owner and time, verification time) and indexes.
create table goto (
    sha1_hash varchar(40) primary key,
    source_filepath text,
    file_created_at timestamp without time zone,
    file_transferred_at timestamp without time zone,
    filepath text,
    tel smallint, run int, ut smallint,          -- metadata columns, per deployment
    created_at timestamp without time zone default now() not null
);
