"""An instrumented copy of fedxray's Flower app for the real-process tests: its server keeps every
array it receives (of one size: the exchanged entry under audit) and each client keeps the update
it trained, so a test can look for a client's update in what the server held."""
import textwrap

import numpy as np

from fedxray.flower import APP_DIR

AUDIT_APP = '''
"""fedxray's Flower app with its server instrumented: every message the ServerApp receives is kept
(its numeric arrays, and the arrays packed as bytes in its config records), and each ClientApp
keeps the update it trained, so the test can look for a client's update in what the server held."""
import itertools
import pathlib

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord
from flwr.common import bytes_to_ndarray
from flwr.serverapp import ServerApp

import fedxray.flower.client_app as client_side
import fedxray.flower.secure as secure
from fedxray.flower import server_app as server_side

AUDIT = pathlib.Path({audit!r})
_count = itertools.count()


def _arrays(content):
    out = []
    for record in content.values():
        if isinstance(record, ArrayRecord):
            out += [a.numpy() for a in record.values()]
        elif isinstance(record, ConfigRecord):
            for value in record.values():
                for item in value if isinstance(value, list) else [value]:
                    if isinstance(item, bytes):
                        try:
                            out.append(bytes_to_ndarray(item))
                        except Exception:
                            pass
    return [a for a in out if a.dtype.kind in "fiu" and a.size == {size}]


class AuditGrid:
    def __init__(self, grid):
        self._grid = grid

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def _keep(self, replies):
        for m in replies:
            if not m.has_error():
                for a in _arrays(m.content):
                    np.save(AUDIT / f"server_{{next(_count)}}.npy", a.reshape(-1))
        return replies

    def pull_messages(self, ids):
        return self._keep(list(self._grid.pull_messages(ids)))

    def send_and_receive(self, messages, *, timeout=None):
        return self._keep(list(self._grid.send_and_receive(messages, timeout=timeout)))


server = ServerApp()


@server.main()
def main(grid, context):
    server_side.main(AuditGrid(grid), context)


_fit = client_side._fit


def _audited_fit(content, config, node):
    site, update, sent = _fit(content, config, node)
    key = {key!r}
    np.save(AUDIT / f"client_{{node.client_id}}_update.npy",
            (update.state[key].double() - sent.state[key].double()).numpy().reshape(-1))
    np.save(AUDIT / f"client_{{node.client_id}}_state.npy", update.state[key].double().numpy().reshape(-1))
    return site, update, sent


client_side._fit = _audited_fit
client = client_side.app
'''


def audit_app(tmp_path, audit, key: str, size: int):
    """An app folder whose components are the instrumented server and client of AUDIT_APP."""
    app = tmp_path / "audit_app"
    app.mkdir(parents=True)
    text = (APP_DIR / "pyproject.toml").read_text()
    text = text.replace('serverapp = "fedxray.flower.server_app:app"', 'serverapp = "fedxray_audit:server"')
    text = text.replace('clientapp = "fedxray.flower.client_app:app"', 'clientapp = "fedxray_audit:client"')
    assert "fedxray_audit:server" in text and "fedxray_audit:client" in text
    (app / "pyproject.toml").write_text(text)
    (app / "fedxray_audit.py").write_text(textwrap.dedent(AUDIT_APP.format(audit=str(audit), key=key, size=size)))
    return app


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64) - a.mean(), b.astype(np.float64) - b.mean()
    return float(abs(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-300))


def largest_correlation(audit, clients) -> float:
    """How much of any client's update (or trained state) shows in any array the server received."""
    received = [np.load(p) for p in sorted(audit.glob("server_*.npy"))]
    assert received, f"the instrumented server kept nothing in {audit}"
    own = [np.load(audit / f"client_{k}_{what}.npy") for k in clients for what in ("update", "state")]
    return max(correlation(a, u) for a in received for u in own)


