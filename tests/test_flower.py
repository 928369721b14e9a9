"""The Flower driver: hospital folders, run config, aggregation, the ClientApp's reply, and the
helpers of the real-process tests (a SuperLink and SuperNodes as processes on 127.0.0.1; the
federation that runs a plain, a SecAgg+ and a DP run one after the other is in
test_flower_secure.py, the fault tests in test_flower_faults.py)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import fedxray
from fedxray import Config
from fedxray.saved_model import load_final
from fedxray.flower import (APP_DIR, config_from_run_config, run_config_from_config, write_client_folders,
                            write_nih_folder, write_run_config)
from fedxray.flower.runconfig import FLOWER_KEYS, FaultPolicy, fault_policy
from fedxray.model import EXCHANGED_PREFIXES, exchanged_keys, get_state

# The whole federation test, from the first process to the last file. The slowest takes about 200 s
# on 2 idle cores; in one run on the same machine after hours idle two of them ran past 300 s (each
# Flower process imports torch; a cold page cache is the likely cause, not proven).
DEADLINE_S = 480
TINY = dict(num_clients=2, num_rounds=2, batch_size=8, image_size=64, weights=None, preload=True,
            progress=False, eval_batch_size=64, seed=0)


def _frames(tiny_splits):
    """The two clients' tables: what the hospitals hold, and what the in-process run is given."""
    return fedxray.partition(tiny_splits["train"], 2, seed=0)


# ----------------------------------------------------------------------------- without flwr

def test_importing_fedxray_does_not_import_flwr():
    code = "import sys, fedxray, fedxray.flower; print('flwr' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_client_folders_hold_only_their_rows_and_are_never_overwritten(tiny_splits, tmp_path):
    parts = _frames(tiny_splits)
    dirs = write_client_folders(parts, tmp_path / "sites")
    assert [d.name for d in dirs] == ["hospital_0", "hospital_1"]
    for part, d in zip(parts, dirs):
        back = fedxray.load_nih(d)
        cols = [c for c in part.columns if c != "path"]
        pd.testing.assert_frame_equal(back[cols], part[cols])              # same rows, same order
        assert sorted(p.name for p in (d / "images").iterdir()) == sorted(part["image"])
        for src, dst in zip(part["path"], back["path"]):
            assert Path(dst).is_relative_to(d) and Path(src).read_bytes() == Path(dst).read_bytes()
    with pytest.raises(FileExistsError, match="not empty"):
        write_client_folders(parts, tmp_path / "sites")
    with pytest.raises(fedxray.DataError, match="patient"):
        write_client_folders([parts[0], parts[0]], tmp_path / "twice")
    assert not (tmp_path / "twice").exists()                              # checked before writing
    write_nih_folder(tiny_splits["val"], tmp_path / "server" / "val")
    assert len(fedxray.load_nih(tmp_path / "server" / "val")) == len(tiny_splits["val"])


def test_app_run_config_is_every_config_field_with_its_default(tmp_path):
    app = tomllib.loads((APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "fedxray.flower.server_app:app",
                                 "clientapp": "fedxray.flower.client_app:app"}
    keys = set(app["config"])
    assert keys == set(run_config_from_config(Config())) | set(FLOWER_KEYS)
    assert config_from_run_config(app["config"]) == Config(progress=False)
    assert fault_policy(app["config"], Config()) == FaultPolicy() == FaultPolicy(None, 3600.0)   # strict
    cfg = Config(**TINY, max_images=7, lr=1e-05, strategy="fedadam", eta=0.05)   # a set and an unset hyperparameter
    path = write_run_config(tmp_path / "run.toml", cfg, "out", "val", "test", FaultPolicy(1, 30.0))
    values = tomllib.loads(path.read_text())
    assert config_from_run_config(values) == cfg
    assert fault_policy(values, cfg) == FaultPolicy(1, 30.0)
    assert Path(values["output-dir"]).is_absolute() and set(values) == keys
    with pytest.raises(ValueError, match="neither a fedxray Config field"):
        config_from_run_config({"batch_size": 8})
    for bad in (0, 3, 1.5, True):   # TINY samples 2 clients per round
        with pytest.raises(ValueError, match="min-replies"):
            fault_policy({"min-replies": bad}, cfg)
    with pytest.raises(ValueError, match="round-timeout"):
        fault_policy({"round-timeout": 0}, cfg)


# ----------------------------------------------------------------------------- with flwr, in process

def _random_states(n_clients: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [{"layer4.0.conv1.weight": torch.randn(4, 3, 3, 3, generator=g),
             "layer4.0.bn1.running_var": torch.rand(4, generator=g) + 0.5,
             "layer4.0.bn1.num_batches_tracked": torch.tensor(int(torch.randint(0, 50, (), generator=g))),
             "fc.bias": torch.randn(14, generator=g)} for _ in range(n_clients)]


def _message(content, message_type, src=1, dst=2):
    from flwr.app import Message, Metadata
    meta = Metadata(run_id=1, message_id=f"m{src}-{dst}", src_node_id=src, dst_node_id=dst,
                    reply_to_message_id="", group_id="", created_at=time.time(), ttl=3600.0,
                    message_type=message_type)
    return Message(content=content, metadata=meta)


DIGEST = "ab" * 32   # an image-list digest, as a query answer carries it


def _strategy(states, counts, **config):
    """A fedavg FedXrayStrategy that sent states' shape of zeros to clients 0..n-1 on nodes 10, 11, ..."""
    from fedxray.flower.strategy import FedXrayStrategy
    from fedxray.strategies import make_strategy
    strategy = connected(FedXrayStrategy(Config(num_clients=len(counts), **config),
                                         make_strategy("fedavg", num_clients=len(counts))), counts)
    strategy.chosen = list(range(len(counts)))
    strategy.sent = {k: torch.zeros_like(v) for k, v in states[0].items()}
    return strategy


def connected(flower, counts):
    """A FedXrayStrategy as connect leaves it: clients 0..n-1 on nodes 10, 11, ..., holding counts
    examples, each with the image-list digest DIGEST."""
    flower.node_of = {k: 10 + k for k in range(len(counts))}
    flower.client_examples = dict(enumerate(counts))
    flower.client_digests = {k: DIGEST for k in range(len(counts))}
    return flower


def test_flower_fedavg_aggregation_is_fedxray_fedavg():
    pytest.importorskip("flwr", reason="flwr not installed: pip install -e '.[flower]'")
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from fedxray.client import ClientUpdate
    from fedxray.flower.records import to_state, train_reply
    from fedxray.flower.strategy import RoundFailed

    states = _random_states(3)
    counts = [5, 17, 2]
    replies = [train_reply(ClientUpdate(s, n, 0.1 * (k + 1)), k, DIGEST) for k, (s, n) in enumerate(zip(states, counts))]
    order = (2, 0, 1)                                                      # arrival order is arbitrary
    messages = [_message(replies[i], "train", src=10 + i) for i in order]
    expected = fedxray.fedavg(states, counts)

    # The fedavg strategy's aggregate_train returns exactly fedxray.fedavg's state and the example-weighted
    # loss (num_batches_tracked: up to 50 batches, within local_epochs x ceil(n / batch_size)).
    strategy = _strategy(states, counts, batch_size=1, local_epochs=25)
    seen = []
    strategy.on_train = lambda r, ids, updates, dropped, sent: seen.append((r, ids, dropped))
    arrays, metrics = strategy.aggregate_train(1, messages)
    for key, value in to_state(arrays).items():
        assert value.dtype == expected[key].dtype and torch.equal(value, expected[key]), key
    assert metrics["train_loss"] == pytest.approx(np.average([0.1, 0.2, 0.3], weights=counts))
    assert seen == [(1, [0, 1, 2], [])]
    strategy.chosen = [0, 1, 2, 3]                                        # client 3 never answered
    strategy.node_of[3], strategy.client_examples[3] = 13, 4
    with pytest.raises(RoundFailed, match=r"client 3 \(node 13\) no_reply: no reply within round-timeout"):
        strategy.aggregate_train(1, messages)

    # Flower's own FedAvg aggregation agrees on float entries to float32 rounding, but sums in
    # float32 and returns num_batches_tracked as an unrounded float64: why fedxray's strategies are used.
    flower = to_state(aggregate_arrayrecords([replies[i] for i in order], "num-examples"))
    for key in expected:
        if expected[key].is_floating_point():
            torch.testing.assert_close(flower[key], expected[key], rtol=1e-6, atol=1e-6)
    nbt = "layer4.0.bn1.num_batches_tracked"
    assert flower[nbt].dtype == torch.float64 and expected[nbt].dtype == torch.int64
    assert float(flower[nbt]) == pytest.approx(float(np.average([int(s[nbt]) for s in states], weights=counts)))


def test_client_app_replies_with_exactly_the_exchanged_keys(tiny_splits, tmp_path):
    pytest.importorskip("flwr", reason="flwr not installed: pip install -e '.[flower]'")
    from flwr.app import ConfigRecord, Context, RecordDict

    from fedxray.checkpoint import image_list_digest
    from fedxray.flower import client_app
    from fedxray.flower.records import check_trunk, to_record
    from fedxray.model import trunk_digest

    dirs = write_client_folders(_frames(tiny_splits), tmp_path / "sites")
    config = Config(**TINY)
    ctx = Context(run_id=1, node_id=2, node_config={"data-dir": str(dirs[1]), "client-id": 1},
                  state=RecordDict(), run_config=run_config_from_config(config))
    answer = client_app.app(_message(RecordDict(), "query"), ctx)
    frame = fedxray.load_nih(dirs[1])
    assert dict(answer.content["metrics"]) == {"client-id": 1, "num-examples": len(frame),
                                               "label-counts": frame[list(fedxray.LABELS)].sum().tolist()}
    assert dict(answer.content["config"]) == {"image-list-digest": image_list_digest(frame)}

    torch.manual_seed(config.seed)
    model = fedxray.build_model(14, None)
    keys = exchanged_keys(model)
    sent = RecordDict({"arrays": to_record(get_state(model, keys)),
                       "config": ConfigRecord({"server-round": 1, "trunk-digest": trunk_digest(model)})})
    reply = client_app.app(_message(sent, "train"), ctx)
    assert not reply.has_error()
    assert set(reply.content.keys()) == {"arrays", "metrics", "config"}
    assert dict(reply.content["config"]) == {"image-list-digest": image_list_digest(fedxray.load_nih(dirs[1]))}
    assert list(reply.content["arrays"].keys()) == keys
    assert all(k.startswith(EXCHANGED_PREFIXES) for k in keys) and "conv1.weight" not in keys
    assert set(reply.content["metrics"].keys()) == {"num-examples", "train_loss", "client-id"}
    other = fedxray.build_model(14, None)                                  # another random trunk
    with pytest.raises(ValueError, match="trunk differs"):
        check_trunk(other, trunk_digest(model), client_id=1)


def test_server_refuses_what_the_flower_app_cannot_do(tiny_splits, tmp_path):
    pytest.importorskip("flwr", reason="flwr not installed: pip install -e '.[flower]'")
    from fedxray.flower.server_app import ServerRun

    val = write_nih_folder(tiny_splits["val"], tmp_path / "val")
    for local in ("bn", "fc"):
        with pytest.raises(ValueError, match="local-keys='.*' \\(personalization\\)"):
            ServerRun(Config(**TINY, local_keys=local), val, val, tmp_path / "out")
    with pytest.raises(ValueError, match="site-test-fraction"):
        ServerRun(Config(**TINY, site_test_fraction=0.2), val, val, tmp_path / "out")
    with pytest.raises(ValueError, match="max_images"):
        ServerRun(Config(**TINY, max_images=10), val, val, tmp_path / "out")


# ----------------------------------------------------------------------------- a real federation

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, until: float) -> bool:
    while time.monotonic() < until:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.2)
    return False


def _children() -> dict[int, list[int]]:
    """ppid -> pids, from /proc (Linux); empty elsewhere."""
    out: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        out.setdefault(ppid, []).append(int(entry.name))
    return out


def _start_time(pid: int):
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None


class Processes:
    """Processes started by a test, each in its own process group with its log in a file; stop()
    ends them and everything they started (Flower's SuperExec, ServerApp and ClientApp processes)."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen] = {}
        self.seen: dict[int, str] = {}   # every descendant pid ever seen -> its start time

    def start(self, name: str, args: list[str], env: dict) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "w")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def note_descendants(self) -> None:
        tree = _children()
        todo = [p.pid for p in self.procs.values()]
        while todo:
            pid = todo.pop()
            for child in tree.get(pid, []):
                if child not in self.seen:
                    self.seen[child] = _start_time(child)
                todo.append(child)

    def dead(self) -> list[str]:
        return [f"{n} (exit {p.returncode})" for n, p in self.procs.items() if p.poll() is not None]

    def stop(self) -> None:
        self.note_descendants()
        for proc in self.procs.values():   # the whole group, even if its leader has exited
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        end = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
            try:
                os.killpg(proc.pid, signal.SIGKILL)   # members that ignored SIGTERM
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.5)
        for pid, started in self.seen.items():       # strays in other sessions, e.g. SuperExec
            if started is not None and _start_time(pid) == started:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def logs(self) -> str:
        return "\n".join(f"===== {p.name} =====\n{p.read_text(errors='replace')[-6000:]}"
                         for p in sorted(self.log_dir.glob("*.log")))


@pytest.fixture()
def processes(tmp_path):
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.stop()


def _flower_env(home: Path) -> dict:
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(PATH=str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),
               FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               PYTHONUNBUFFERED="1")
    return env


def need_flower_processes() -> None:
    """Skip unless the Flower executables and /proc (to find and stop what they start) are here."""
    pytest.importorskip("flwr", reason="flwr not installed: pip install -e '.[flower]'")
    bin_dir = Path(sys.executable).parent
    for tool in ("flower-superlink", "flower-supernode", "flwr", "flower-superexec"):
        if not (bin_dir / tool).exists():
            pytest.skip(f"{tool} not found beside {sys.executable}: pip install -e '.[flower]'")
    if not Path("/proc/self/stat").exists():
        pytest.skip("needs /proc to find and stop every process Flower starts")


class Federation:
    """One SuperLink and one SuperNode per site folder on 127.0.0.1 (each site k is client k), and
    `flwr run` against them, all started through a Processes."""

    def __init__(self, processes: Processes, home: Path, sites, until: float, app_dir: Path = APP_DIR):
        self.processes, self.home, self.until = processes, home, until
        self.app_dir = app_dir   # the app `flwr run` submits
        self.port = _free_port()
        processes.start("superlink", ["flower-superlink", "--insecure", "--host", "127.0.0.1",
                                      "--port", str(self.port), "--disable-runtime-dependency-installation"],
                        _flower_env(home / "home_superlink"))
        for k, site in enumerate(sites):
            processes.start(f"supernode_{k}", [
                "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                "--host", "127.0.0.1", "--port", str(_free_port()),
                "--node-config", f'data-dir="{site}" client-id={k}'], _flower_env(home / f"home_node_{k}"))
        assert _wait_for_port(self.port, until), "the SuperLink did not open its port"
        self.cli_env = _flower_env(home / "home_cli")
        (home / "home_cli" / "config.toml").write_text(
            f'[superlink]\ndefault = "fedxray-test"\n\n[superlink.fedxray-test]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')

    def run(self, overrides: Path, name: str = "flwr_run") -> subprocess.Popen:
        return self.processes.start(name, ["flwr", "run", str(self.app_dir), "fedxray-test", "--run-config",
                                           str(overrides), "--stream"], self.cli_env)

    def wait(self, done, what: str, run: subprocess.Popen, may_die=("flwr_run",)) -> None:
        """Poll done() until it holds; fail on the deadline, when a process not in may_die
        (prefixes) dies, or when `flwr run` ended and done() stays false for 10 s more."""
        ended = None
        while not done():
            assert time.monotonic() < self.until, f"{what}: not after {DEADLINE_S} s"
            self.processes.note_descendants()
            dead = [d for d in self.processes.dead() if not d.startswith(tuple(may_die))]
            assert not dead, f"died: {dead}"
            if run.poll() is not None:
                ended = ended or time.monotonic()
                if time.monotonic() - ended > 10:
                    pytest.fail(f"`flwr run` ended (exit {run.returncode}) before {what}")
            time.sleep(0.5)

    def serverapp_pids(self) -> list[int]:
        """The ServerApp processes: `flwr-serverapp`, started by the SuperLink's SuperExec."""
        self.processes.note_descendants()
        pids = []
        for pid in self.processes.seen:
            try:
                cmd = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(Path(part.decode(errors="replace")).name == "flwr-serverapp" for part in cmd[:2]):
                pids.append(pid)
        return pids


def compare_with_in_process(out: Path, sim_dir: Path, sim_model, rounds: int, own_info=()) -> None:
    """A Flower run's files hold the in-process run's weights, config, run info (but the entries
    own_info), final record (rounds, inputs, trunk) and history (the same rows in the same order,
    values to float tolerance)."""
    final, sim_final = (load_final(d / "final_model.pt") for d in (out, sim_dir))
    want = {k: v for k, v in sim_model.state_dict().items() if k.startswith(EXCHANGED_PREFIXES)}
    assert set(final["state"]) == set(want) == set(sim_final["state"])
    for key, value in want.items():
        torch.testing.assert_close(final["state"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    for k, v in fedxray.load_model(out / "final_model.pt").state_dict().items():   # rebuilt whole
        torch.testing.assert_close(v, sim_model.state_dict()[k], rtol=1e-5, atol=1e-6, msg=k)

    assert json.loads((out / "config.json").read_text()) == json.loads((sim_dir / "config.json").read_text())
    info, sim_info = (json.loads((d / "run_info.json").read_text()) for d in (out, sim_dir))
    assert {k: info[k] for k in sim_info if k not in own_info} == {k: v for k, v in sim_info.items()
                                                                   if k not in own_info}
    assert info["engine"] == "flower"
    assert final["round"] == sim_final["round"] == rounds
    assert not (out / "checkpoint.pt").exists() and not (sim_dir / "checkpoint.pt").exists()
    assert final["inputs"] == sim_final["inputs"]        # the same trunk, val, test and client image lists
    assert final["trunk"] == sim_final["trunk"]
    key_cols = ["round", "split", "client", "metric"]
    h, sim_h = (pd.read_csv(d / "history.csv", dtype={"client": str}) for d in (out, sim_dir))
    assert list(h.columns) == list(sim_h.columns)
    assert h[key_cols].values.tolist() == sim_h[key_cols].values.tolist()   # same rows, same order
    np.testing.assert_allclose(h["value"], sim_h["value"], rtol=1e-4, atol=1e-5, equal_nan=True)
