"""Model selection by validation: which round's global model a run reports, tests and saves.

Both drivers (fedxray.federated's loop and the Flower server) offer every evaluated round to one
BestRound and, when the rounds are done, test and save the model it holds. The choice is made on
validation only: test never decides which model is reported.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

import math

import torch

from . import history as hist

# Config.select_round: "best_val" = the round (>= 1) with the highest validation mean AUROC of the
# global model, the earliest on a tie; "last" = the last round, whatever validation says.
SELECT_ROUNDS = ("best_val", "last")
SELECTED = "selected_round"   # the history metric naming the round reported (split "val", client global)


def _copy(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


class BestRound:
    """The round a run reports and the states of its model: the global state and each client's
    local state (FedBN's BatchNorm; empty otherwise). offer() every round, round 0 included (the
    untrained model is never chosen: a run reports a trained model)."""

    def __init__(self, rule: str = "best_val"):
        if rule not in SELECT_ROUNDS:
            raise ValueError(f"select_round must be one of {SELECT_ROUNDS}, got {rule!r}")
        self.rule = rule
        self.round: Optional[int] = None
        self.score = -math.inf
        self.global_state: dict[str, torch.Tensor] = {}
        self.local_states: dict[int, dict[str, torch.Tensor]] = {}

    def offer(self, round_num: int, rows: Sequence[dict], global_state: Mapping[str, torch.Tensor],
              local_states: Mapping[int, Mapping[str, torch.Tensor]]) -> bool:
        """Consider the model of round_num, whose evaluation rows are rows; True when it is now the
        chosen one. A round without a finite validation mean AUROC (no validation set, or a
        finding-less one) is chosen only by rule "last" or when nothing better was seen."""
        if round_num < 1:
            return False
        score = hist.last_value(list(rows), "val", "mean_auroc")
        score = score if math.isfinite(score) else -math.inf
        if self.rule == "best_val" and self.round is not None and not score > self.score:
            return False
        self.round, self.score = int(round_num), score
        self.global_state = _copy(global_state)
        self.local_states = {int(c): _copy(s) for c, s in local_states.items()}
        return True

    def row(self, last_round: int) -> dict:
        """The history row that records the choice (at the last round, metric SELECTED)."""
        if self.round is None:
            raise ValueError("no round was offered: nothing to select")
        return hist.row(last_round, "val", hist.GLOBAL, SELECTED, self.round)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, current_round: int) -> dict:
        """What a checkpoint keeps: the round and score, and the states unless they are the current
        round's (which the checkpoint holds anyway)."""
        keep = self.round is not None and self.round != current_round
        return {"round": -1 if self.round is None else self.round, "score": float(self.score),
                "global_state": self.global_state if keep else {},
                "local_states": {str(c): s for c, s in self.local_states.items()} if keep else {}}

    def load_state_dict(self, saved: Mapping, current_round: int, global_state: Mapping[str, torch.Tensor],
                        local_states: Mapping[int, Mapping[str, torch.Tensor]], path: Path) -> None:
        """Restore from a checkpoint's entry, checked against the model's own states (ValueError
        naming the file otherwise)."""
        from .model import state_problems
        try:
            r, score = saved["round"], saved["score"]
            ok = isinstance(r, int) and not isinstance(r, bool) and -1 <= r <= current_round and r != 0 \
                and isinstance(score, float) and (math.isfinite(score) or score == -math.inf)
        except (KeyError, TypeError):
            ok = False
        if not ok:
            raise ValueError(f"{path}: its model-selection entry is malformed ({dict(saved) if isinstance(saved, Mapping) else saved!r:.200})")
        self.round, self.score = (None if r == -1 else r), score
        if r in (-1, current_round):
            self.global_state = _copy(global_state) if r != -1 else {}
            self.local_states = {int(c): _copy(s) for c, s in local_states.items()} if r != -1 else {}
            return
        problems = state_problems(saved["global_state"], global_state)
        for c, own in local_states.items():
            problems += state_problems(saved["local_states"].get(str(c), {}), own)
        if problems:
            raise ValueError(f"{path}: the state of the selected round {r} does not fit this model "
                             f"({'; '.join(problems[:3])})")
        self.global_state = _copy(saved["global_state"])
        self.local_states = {int(c): _copy(saved["local_states"][str(c)]) for c in local_states}


def reported_round(history, client: str = hist.GLOBAL) -> Optional[int]:
    """The round whose model a history reports: its SELECTED row (the model-selection choice), else
    (a history written before model selection, or one cut short) the last round with test scores."""
    h = history if not isinstance(history, list) else hist.frame(history)
    chosen = hist.select(h, "val", SELECTED, client)
    if len(chosen):
        return int(chosen["value"].iloc[-1])
    test = hist.select(h, "test", "mean_auroc", client)
    return int(test["round"].max()) if len(test) else None
