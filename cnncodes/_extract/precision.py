"""precision="auto" for a new store, decided by timing each candidate precision on the run's first images."""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from cnncodes._extract.accel import cpu_has_fast_bf16, resolve_precision, reuse_freed_memory
from cnncodes._io import atomic_write

# A reduced precision is kept only when its codes of the probe batch agree with the float32
# codes of the same images to this cosine, in every row and layer.
AGREEMENT = 0.999
# The probe: the run's first PROBE_IMAGES images are decoded once; each candidate runs them
# once untimed (a warm-up), then TIMED_BATCHES times timed, the candidates taking turns so that
# a change of load on a shared machine hits them alike; a candidate's time is its fastest pass.
# It runs only where its forward passes, candidates x (1 + TIMED_BATCHES) x PROBE_IMAGES
# images, are at most PROBE_SHARE of the run's images, else the rule of `resolve_precision`
# decides. Probing with whole batches of 64 made `extract` of 1,000 flowers5 photos 0.69x as
# fast as the forced precision (2 AMD cores, shared): 6 of the run's 16 batches spent twice.
# A candidate whose timed pass took LONG_PASS seconds or more is not timed again: its noise
# is small next to it, and a second pass of a slow candidate (ResNet50 in float32 on 2 cores:
# 0.65 s for 16 images) is spent for nothing when the other wins.
PROBE_IMAGES = 16
TIMED_BATCHES = 2
LONG_PASS = 0.25
PROBE_SHARE = 0.1
CHOICE_FILE = "precision_choice.json"  # in an interrupted run's journal: what its probe found


@dataclass
class PrecisionChoice:
    """The precision of a new store's codes, and how it was chosen.

    ``how`` is ``"measured"`` (the probe ran), ``"rule"`` (one candidate, or a run too short
    to probe) or ``"resumed"`` (an interrupted run chose it). ``seconds`` holds each
    candidate's time per batch of ``batch`` images, ``agreement`` the lowest cosine of its
    codes to float32's.
    """

    precision: str
    how: str
    batch: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    agreement: dict[str, float] = field(default_factory=dict)
    reason: str = ""  # why the rule decided
    forward: object = field(default=None, repr=False, compare=False)  # the winner's CodesForward

    def to_json(self) -> dict:
        return {"precision": self.precision, "how": self.how, "reason": self.reason, "batch": self.batch,
                "seconds_per_batch": self.seconds,
                # NaN (non-finite codes) as null: the attribute stays standard JSON
                "cosine_to_float32": {p: c if np.isfinite(c) else None for p, c in self.agreement.items()},
                "agreement_bound": AGREEMENT}

    @classmethod
    def from_json(cls, d: dict) -> PrecisionChoice:
        agreement = {p: float("nan") if c is None else c for p, c in d.get("cosine_to_float32", {}).items()}
        return cls(d["precision"], d["how"], d.get("batch", 0), d.get("seconds_per_batch", {}), agreement,
                   d.get("reason", ""))

    def describe(self) -> str:
        """One line for the run's summary."""
        if self.how == "rule":
            return f"precision {self.precision} (auto, by rule: {self.reason})."
        parts = []
        for p in sorted(self.seconds, key=lambda p: p != "float32"):  # the reference first
            s = self.seconds[p]
            rate = f"{self.batch / s:.1f} img/s" if s > 0 else "n/a"
            agree = "" if p == "float32" else (  # NaN (non-finite codes) fails the bound too
                f", cosine {self.agreement[p]:.4f}" + ("" if self.agreement[p] >= AGREEMENT else " REFUSED"))
            parts.append(f"{p} {rate}{agree}")
        how = "measured" if self.how == "measured" else "measured by the interrupted run"
        return f"precision {self.precision} (auto, {how} on {self.batch} images: " + "; ".join(parts) + ")."


def candidates(device: torch.device) -> list[str]:
    """The precisions worth timing on `device`, float32 (the reference) first."""
    if device.type == "cuda":
        return ["float32", *(["bfloat16"] if torch.cuda.is_bf16_supported() else []), "float16"]
    if device.type == "cpu" and cpu_has_fast_bf16():
        return ["float32", "bfloat16"]
    return ["float32"]


def time_forward(forward, batch) -> tuple[float, dict[str, np.ndarray]]:
    """Seconds one forward pass of `batch` takes, and its codes (tests replace the seconds)."""
    t = time.perf_counter()
    codes = forward(batch)
    return time.perf_counter() - t, codes


def min_cosine(codes: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    """The lowest cosine between a row of `codes` and the same row of `reference`, over layers."""
    worst = 1.0
    for alias, ref in reference.items():
        a, b = codes[alias].astype(np.float64), ref.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        if not np.isfinite(cos).all():
            return float("nan")  # non-finite codes agree with nothing
        worst = min(worst, float(cos.min()))
    return worst


def _rule(device, reason: str) -> PrecisionChoice:
    return PrecisionChoice(resolve_precision("auto", device), "rule", reason=reason)


def measure_precision(first_images, make_forward, device: torch.device, n_items: int) -> PrecisionChoice:
    """Choose a new store's precision: the fastest candidate whose codes agree with float32.

    Parameters
    ----------
    first_images : callable
        ``first_images(n)`` returns the run's first `n` images decoded as one batch (as
        `CodesForward` takes it), or None when none of them decodes; called only when the
        probe runs.
    make_forward : callable
        ``make_forward(precision)`` builds the eager `CodesForward` of that precision.
    device : torch.device
    n_items : int
        The run's size: the probe runs where it costs at most `PROBE_SHARE` of its work.

    Returns
    -------
    PrecisionChoice
        With ``forward`` the winner's model, ready for the run.
    """
    cands = candidates(device)
    if len(cands) < 2:
        return _rule(device, "one candidate on this device")
    cost = len(cands) * (1 + TIMED_BATCHES) * PROBE_IMAGES
    if cost > PROBE_SHARE * n_items:
        return _rule(device, f"{n_items} images, too few to repay timing {len(cands)} precisions "
                             f"on {PROBE_IMAGES} of them")
    batch = first_images(PROBE_IMAGES)
    if batch is None:
        return _rule(device, f"none of the first {PROBE_IMAGES} images decodes")
    n = batch.shape[0] if isinstance(batch, torch.Tensor) else len(batch)
    with reuse_freed_memory(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # autocast's notes on ops it keeps in float32
        forwards = {p: make_forward(p) for p in cands}
        codes = {p: f(batch) for p, f in forwards.items()}  # warm-up, untimed
        seconds = {p: float("inf") for p in cands}
        for _ in range(TIMED_BATCHES):
            for p, f in forwards.items():
                if seconds[p] >= LONG_PASS and np.isfinite(seconds[p]):
                    continue  # timed once, long enough
                s, codes[p] = time_forward(f, batch)
                seconds[p] = min(seconds[p], s)
    agreement = {p: min_cosine(codes[p], codes["float32"]) for p in cands if p != "float32"}
    ok = ["float32"] + [p for p in cands if p != "float32" and agreement[p] >= AGREEMENT]
    best = min(ok, key=lambda p: seconds[p])
    return PrecisionChoice(best, "measured", n, seconds, agreement, forward=forwards[best])


def resumed_choice(journal) -> PrecisionChoice | None:
    """The precision an interrupted first run of this store chose, from its journal, or None."""
    meta = journal.folder / "spec.json"
    if not meta.is_file():
        return None
    precision = json.loads(meta.read_text()).get("precision", "float32")
    saved = journal.folder / CHOICE_FILE
    if saved.is_file():
        choice = PrecisionChoice.from_json(json.loads(saved.read_text()))
        choice.how = "resumed"
        return choice
    return PrecisionChoice(precision, "rule", reason="as the interrupted run chose")


def save_choice(journal, choice: PrecisionChoice) -> None:
    """Keep a measured choice in the run's journal, so that a resumed run records it too."""
    if choice.how == "measured" and journal.exists() and not (journal.folder / CHOICE_FILE).exists():
        with atomic_write(journal.folder / CHOICE_FILE) as fh:  # a resumed run reads it whole or not at all
            fh.write(json.dumps(choice.to_json(), sort_keys=True).encode())
