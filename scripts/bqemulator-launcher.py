"""Starts bqemulator (PyPI 1.4.0) on a machine that must not reach the network.

As published, bqemulator refuses to start unless it can download DuckDB's spatial extension
(used only for GEOGRAPHY columns, which Haishin has none of). This launcher keeps it offline:
the spatial extension is loaded only if it is already installed, a missing one is logged
instead of fatal, DuckDB never installs an extension by itself, and the Avro extension is
not fetched. Every argument is passed on to `bqemulator`, e.g.

    python scripts/bqemulator-launcher.py start --rest-host 127.0.0.1 --rest-port 9050 --grpc-port 9060
"""

import os
import sys

os.environ.setdefault("BQEMU_ENABLE_FORMAT_EXTENSIONS", "false")

from bqemulator.cli import main  # noqa: E402
from bqemulator.storage import engine  # noqa: E402

_apply_session_pragmas = engine.DuckDBEngine._apply_session_pragmas


def _offline_session_pragmas(self):
    _apply_session_pragmas(self)
    self._connection.execute("SET autoinstall_known_extensions = false")


def _load_spatial_if_present(self):
    try:
        self._connection.execute("LOAD spatial")
    except Exception as exc:  # noqa: BLE001 - GEOGRAPHY is optional here
        engine._log.warning("duckdb.spatial_unavailable", error=str(exc))


engine.DuckDBEngine._apply_session_pragmas = _offline_session_pragmas
engine.DuckDBEngine._load_spatial = _load_spatial_if_present

if __name__ == "__main__":
    sys.argv[0] = "bqemulator"
    main()
