"""pytest plugin: a scratch PostgreSQL cluster for the tests (filled in by the backends work)."""
