"""The Flower driver: hospital folders, run config, aggregation, the ClientApp's reply, and a real
federation (one SuperLink and two SuperNodes as processes on 127.0.0.1) against the in-process run."""
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
from fedxray import Config, run_federated
from fedxray.flower import (APP_DIR, SERVER_KEYS, config_from_run_config, run_config_from_config,
                            write_client_folders, write_nih_folder, write_run_config)
from fedxray.model import EXCHANGED_PREFIXES, exchanged_keys, get_state

DEADLINE_S = 300          # the whole federation test, from the first process to the last file
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
    assert keys == set(run_config_from_config(Config())) | set(SERVER_KEYS)
    assert config_from_run_config(app["config"]) == Config(progress=False)
    cfg = Config(**TINY, max_images=7, lr=1e-05)
    path = write_run_config(tmp_path / "run.toml", cfg, "out", "val", "test")
    values = tomllib.loads(path.read_text())
    assert config_from_run_config(values) == cfg
    assert Path(values["output-dir"]).is_absolute() and set(values) == keys
    with pytest.raises(ValueError, match="neither a fedxray Config field"):
        config_from_run_config({"batch_size": 8})


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


def test_flower_aggregation_is_fedxray_fedavg():
    pytest.importorskip("flwr", reason="flwr not installed: pip install -e '.[flower]'")
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from fedxray.client import ClientUpdate
    from fedxray.flower.records import aggregate, to_state, train_reply
    from fedxray.flower.strategy import FedXrayAvg

    states = _random_states(3)
    counts = [5, 17, 2]
    replies = [train_reply(ClientUpdate(s, n, 0.1 * (k + 1)), k) for k, (s, n) in enumerate(zip(states, counts))]
    shuffled = [replies[i] for i in (2, 0, 1)]                             # arrival order is arbitrary
    expected = fedxray.fedavg(states, counts)
    got, pairs = aggregate(shuffled, list(states[0]))
    assert [k for k, _ in pairs] == [0, 1, 2]
    for key in expected:
        assert got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key]), key

    # The strategy's aggregate_train returns exactly that state and the example-weighted loss.
    strategy = FedXrayAvg(Config(num_clients=3), list(states[0]))
    strategy.chosen = [0, 1, 2]
    arrays, metrics = strategy.aggregate_train(1, [_message(c, "train", src=10 + i) for i, c in enumerate(shuffled)])
    for key, value in to_state(arrays).items():
        assert torch.equal(value, expected[key]), key
    assert metrics["train_loss"] == pytest.approx(np.average([0.1, 0.2, 0.3], weights=counts))
    strategy.chosen = [0, 1, 2, 3]
    with pytest.raises(RuntimeError, match=r"clients \[0, 1, 2, 3\] were asked"):
        strategy.aggregate_train(1, [_message(c, "train") for c in shuffled])

    # Flower's own FedAvg aggregation agrees on float entries to float32 rounding, but sums in
    # float32 and returns num_batches_tracked as an unrounded float64: why fedxray.fedavg is used.
    flower = to_state(aggregate_arrayrecords(shuffled, "num-examples"))
    for key in expected:
        if expected[key].is_floating_point():
            torch.testing.assert_close(flower[key], expected[key], rtol=1e-6, atol=1e-6)
    nbt = "layer4.0.bn1.num_batches_tracked"
    assert flower[nbt].dtype == torch.float64 and expected[nbt].dtype == torch.int64
    assert float(flower[nbt]) == pytest.approx(float(np.average([int(s[nbt]) for s in states], weights=counts)))


def test_client_app_replies_with_exactly_the_exchanged_keys(tiny_splits, tmp_path):
    pytest.importorskip("flwr", reason="flwr not installed: pip install -e '.[flower]'")
    from flwr.app import ConfigRecord, Context, RecordDict

    from fedxray.flower import client_app
    from fedxray.flower.records import check_trunk, to_record
    from fedxray.model import trunk_digest

    dirs = write_client_folders(_frames(tiny_splits), tmp_path / "sites")
    config = Config(**TINY)
    ctx = Context(run_id=1, node_id=2, node_config={"data-dir": str(dirs[1]), "client-id": 1},
                  state=RecordDict(), run_config=run_config_from_config(config))
    answer = client_app.app(_message(RecordDict(), "query"), ctx)
    assert dict(answer.content["metrics"]) == {"client-id": 1, "num-examples": len(fedxray.load_nih(dirs[1]))}

    torch.manual_seed(config.seed)
    model = fedxray.build_model(14, None)
    keys = exchanged_keys(model)
    sent = RecordDict({"arrays": to_record(get_state(model, keys)),
                       "config": ConfigRecord({"server-round": 1, "trunk-digest": trunk_digest(model)})})
    reply = client_app.app(_message(sent, "train"), ctx)
    assert not reply.has_error()
    assert set(reply.content.keys()) == {"arrays", "metrics"}
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
    with pytest.raises(ValueError, match="FedBN"):
        ServerRun(Config(**TINY, bn_policy="local"), val, val, tmp_path / "out")
    with pytest.raises(ValueError, match="max_images"):
        ServerRun(Config(**TINY, max_images=10), val, val, tmp_path / "out")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="feature_cache"):
        ServerRun(Config(**TINY, feature_cache=True), val, val, tmp_path / "out")
    with pytest.raises(FileExistsError, match="does not resume"):
        ServerRun(Config(**TINY), val, val, tmp_path / "out")


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


def test_flower_deployment_equals_in_process_run(tiny_splits, tmp_path, processes):
    pytest.importorskip("flwr", reason="flwr not installed: pip install -e '.[flower]'")
    bin_dir = Path(sys.executable).parent
    for tool in ("flower-superlink", "flower-supernode", "flwr", "flower-superexec"):
        if not (bin_dir / tool).exists():
            pytest.skip(f"{tool} not found beside {sys.executable}: pip install -e '.[flower]'")
    if not Path("/proc/self/stat").exists():
        pytest.skip("needs /proc to find and stop every process Flower starts")
    until = time.monotonic() + DEADLINE_S
    config = Config(**TINY)
    parts = _frames(tiny_splits)
    sites = write_client_folders(parts, tmp_path / "sites")
    val_dir = write_nih_folder(tiny_splits["val"], tmp_path / "server" / "val")
    test_dir = write_nih_folder(tiny_splits["test"], tmp_path / "server" / "test")
    out = tmp_path / "flower_run"
    overrides = write_run_config(tmp_path / "run_config.toml", config, out, val_dir, test_dir)

    link_port = _free_port()
    try:
        processes.start("superlink", ["flower-superlink", "--insecure", "--host", "127.0.0.1",
                                      "--port", str(link_port), "--disable-runtime-dependency-installation"],
                        _flower_env(tmp_path / "home_superlink"))
        for k, site in enumerate(sites):
            processes.start(f"supernode_{k}", [
                "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                "--host", "127.0.0.1", "--port", str(_free_port()),
                "--node-config", f'data-dir="{site}" client-id={k}'], _flower_env(tmp_path / f"home_node_{k}"))
        assert _wait_for_port(link_port, until), "the SuperLink did not open its port"
        cli_env = _flower_env(tmp_path / "home_cli")
        (tmp_path / "home_cli" / "config.toml").write_text(
            f'[superlink]\ndefault = "fedxray-test"\n\n[superlink.fedxray-test]\n'
            f'address = "127.0.0.1:{link_port}"\ninsecure = true\n')
        run = processes.start("flwr_run", ["flwr", "run", str(APP_DIR), "fedxray-test", "--run-config",
                                           str(overrides), "--stream"], cli_env)

        # The in-process simulation with the same seed, partition and client ids, meanwhile.
        sim = run_federated(config, tiny_splits, tmp_path / "sim_run", client_frames=parts)

        final = out / "final_model.pt"
        while not final.exists():
            assert time.monotonic() < until, f"no {final} after {DEADLINE_S} s"
            processes.note_descendants()
            dead = [d for d in processes.dead() if not d.startswith("flwr_run")]
            assert not dead, f"died: {dead}"
            if run.poll() is not None and not _appears(final, 10):
                pytest.fail(f"`flwr run` ended (exit {run.returncode}) without writing {final}")
            time.sleep(0.5)

        got = torch.load(final, map_location="cpu", weights_only=False)
        want = sim.model.state_dict()
        assert set(got["state_dict"]) == set(want)
        for key, value in want.items():
            torch.testing.assert_close(got["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)

        # The same files, in the same formats, with the same numbers.
        sim_dir = tmp_path / "sim_run"
        assert json.loads((out / "config.json").read_text()) == json.loads((sim_dir / "config.json").read_text())
        info, sim_info = (json.loads((d / "run_info.json").read_text()) for d in (out, sim_dir))
        assert {k: info[k] for k in sim_info} == sim_info and info["engine"] == "flower"
        ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
        sim_ckpt = torch.load(sim_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
        assert set(ckpt) == set(sim_ckpt) and ckpt["round"] == 2 and set(got) == {"state_dict", "labels", "config", "info"}
        key_cols = ["round", "split", "client", "metric"]
        h, sim_h = (pd.read_csv(d / "history.csv", dtype={"client": str}) for d in (out, sim_dir))
        assert list(h.columns) == list(sim_h.columns)
        assert h[key_cols].values.tolist() == sim_h[key_cols].values.tolist()   # same rows, same order
        np.testing.assert_allclose(h["value"], sim_h["value"], rtol=1e-4, atol=1e-5, equal_nan=True)
    except BaseException:
        print(processes.logs())
        raise


def _appears(path: Path, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if path.exists():
            return True
        time.sleep(0.2)
    return path.exists()
