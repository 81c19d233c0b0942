import subprocess


def test_smoke(sshd_server):
    s = sshd_server
    r = subprocess.run(
        [
            "ssh",
            "-F",
            str(s.ssh_config),
            "-o",
            f"UserKnownHostsFile={s.known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            s.alias,
            "echo hi; ls",
        ],
        capture_output=True,
        text=True,
    )
    print(r)
    assert r.returncode == 0
    r = subprocess.run(
        [
            "ssh",
            "-F",
            str(s.ssh_config),
            "-p",
            str(s.sftp_only_port),
            "-o",
            f"UserKnownHostsFile={s.known_hosts}",
            "-o",
            "BatchMode=yes",
            "127.0.0.1",
            "echo hi",
        ],
        capture_output=True,
        text=True,
        input="",
    )
    print(r)
    print(s.session_pids())
