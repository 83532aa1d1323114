"""`mailingest demo` on PostgreSQL: a private server on loopback, made and removed here.

Run by `sh scripts/demo.sh postgresql`. It uses the test suite's private-cluster helper
(initdb + pg_ctl on a free port, as the postgres user when run as root).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from postgres import PostgresMissing, private_postgres


def main() -> int:
    try:
        with private_postgres(durable=True) as server:
            url = server.new_database()
            print(f"PostgreSQL {server.bin.parent.name} on 127.0.0.1:{server.port}: {url}")
            env = {**os.environ, "PGPASSWORD": server.password}
            argv = [sys.executable, "-m", "mailingest", "demo", "--database", url]
            return subprocess.run(argv, env=env, check=False).returncode
    except PostgresMissing as exc:
        print(exc, file=sys.stderr)
        return 69


if __name__ == "__main__":
    sys.exit(main())
