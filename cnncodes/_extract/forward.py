"""The forward pass both engines share: reading, hashing and decoding images into batches
(in turn or in worker processes, chosen by measuring), and the frozen backbone as one call
(`CodesForward`: uint8 batch in, codes per layer out). The local engine (`_extract`) and the
Ray engine (`_ray`) both build on it; it imports neither.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from cnncodes._backbones.codes_model import codes_model
from cnncodes._errors import CnnCodesError
from cnncodes._input.images import Preprocess, resize_batch
from cnncodes._input.sources import Item, read_hash_decode
from cnncodes._backbones.weights import load_model


class Images(torch.utils.data.Dataset):
    """Reads, hashes and decodes ``items[start:]`` (in DataLoader workers or in the caller).

    Sample ``k`` is item ``start + k``, and that index is what it returns.
    """

    def __init__(self, items: list[Item], prep: Preprocess, max_pixels: int, start: int = 0,
                 storage_options=None):
        self.items, self.prep, self.max_pixels, self.start = items, prep, max_pixels, start
        self.storage_options = storage_options

    def __len__(self):
        return len(self.items) - self.start

    def __getitem__(self, k):
        i = self.start + k
        return (i, *read_hash_decode(self.items[i], self.prep, self.max_pixels, self.storage_options))


def collate(samples):
    """(indices, images, sha256s, failures): the images as one uint8 NCHW tensor, or a list
    of CHW tensors when their sizes differ (left for the device to resize)."""
    ok = [s for s in samples if s[1] is not None]
    bad = [(s[0], s[2], s[3]) for s in samples if s[1] is None]
    images = [s[1] for s in ok]
    if not images:
        images = None
    elif all(x.shape == images[0].shape for x in images):
        # Stacked channels-last (decoded images are CHW views of HWC pixels): what torch's
        # resize and the model read fastest, without a transposing copy here.
        images = torch.stack([x.permute(1, 2, 0) for x in images]).permute(0, 3, 1, 2)
    return [s[0] for s in ok], images, [s[2] for s in ok], bad


def default_workers(n: int, batch_size: int, most: int = 8) -> int:
    """Decoding processes: none for a batch or less, else one per spare core (at most `most`)."""
    if n <= batch_size:
        return 0
    return max(1, min(most, (os.cpu_count() or 2) - 1))


# With num_workers="auto", the first batches are decoded in the calling process and timed:
# the first (cold: imports, file cache) with a thread per core, the second with one thread,
# the third with a thread per core again. The faster thread count decodes the rest, and the
# calling process keeps decoding when its time is at most SERIAL_DECODE_SHARE of the forward
# pass: worker processes would preempt the model's threads, and every parallel region of the
# forward pass waits for its slowest thread. On 2 cores (MobileNetV2, flowers5) that made
# the run 15 % slower than decoding in turn (113 vs 132 img/s). Costlier decoding (large
# photos, a fast GPU) goes to workers. Threads pay where decoding lets go of the GIL:
# 1024x768 JPEGs decode 1.6x faster on 2 threads than on one (4.4 -> 2.7 ms a photo), while
# flowers5's 128 px photos, resized on the device, decode 1.2x slower (0.27 -> 0.32 ms: PIL's
# Python-level parsing is most of their time, and the threads take turns at the GIL).
PROBE_THREADS = (None, 1, None)  # None: a thread per core
SERIAL_DECODE_SHARE = 0.25


def loader(items, prep, max_pixels, batch_size, workers, pin, start=0, storage_options=None, threads=None):
    """Batches of ``items[start:]``: decoded by `workers` processes, or in turn (0) by
    `threads` threads (None: one per core)."""
    images = Images(items, prep, max_pixels, start, storage_options)
    if workers == 0:
        return _in_turn(images, batch_size, pin, threads)
    return torch.utils.data.DataLoader(
        images, batch_size=batch_size, shuffle=False,
        num_workers=workers, collate_fn=collate, pin_memory=pin,
    )


def _in_turn(dataset, batch_size, pin, threads=None):
    """Decode each batch in this process, between forward passes, by `threads` threads.

    PIL lets go of the GIL while it decodes and resizes, so threads share that work (see
    PROBE_THREADS for where they pay). The warnings filters are process-wide: the threads'
    own ``catch_warnings`` blocks (in ``decode``) interleave and can leave them changed, so
    this thread saves and restores them around each batch (nothing else runs here while a
    batch decodes).
    """
    threads = max(1, torch.get_num_threads()) if threads is None else threads
    with ThreadPoolExecutor(max_workers=threads) if threads > 1 else contextlib.nullcontext() as pool:
        take = pool.map if pool is not None else map
        for s in range(0, len(dataset), batch_size):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                samples = list(take(dataset.__getitem__, range(s, min(s + batch_size, len(dataset)))))
            idx, images, shas, bad = collate(samples)
            if pin and images is not None:
                images = images.pin_memory() if isinstance(images, torch.Tensor) else [x.pin_memory() for x in images]
            yield idx, images, shas, bad


def batches(items, prep, max_pixels, batch_size, num_workers, pin, forward_seconds: list, storage_options=None):
    """Yield decoded batches; with num_workers "auto", choose where to decode by measuring.

    `forward_seconds` is filled by the caller with the time of each batch's forward pass.
    """
    auto = num_workers in (None, "auto")
    workers = default_workers(len(items), batch_size) if auto else int(num_workers)
    start, threads = 0, None
    if auto and workers and len(items) > (len(PROBE_THREADS) + 2) * batch_size:
        seconds = {}
        for k, probe in enumerate(PROBE_THREADS):
            t = time.perf_counter()
            batch = next(iter(loader(items[:(k + 1) * batch_size], prep, max_pixels, batch_size, 0, pin,
                                     k * batch_size, storage_options, probe)))
            seconds[probe] = time.perf_counter() - t  # the cold first batch is timed again last
            yield batch
        start = len(PROBE_THREADS) * batch_size
        threads = min(seconds, key=seconds.get)
        if seconds[threads] <= SERIAL_DECODE_SHARE * forward_seconds[-1]:
            workers = 0
    yield from loader(items, prep, max_pixels, batch_size, workers, pin, start, storage_options, threads)


class CodesForward:
    """The frozen backbone as one call: uint8 NCHW batch in, float32 codes per layer out.

    Channels-last memory layout and autocast at the chosen precision on any device; an
    optional ``torch.compile``, fed fixed-size batches (the last one padded) so that it
    compiles once; the mirror-image average for ``tta="flip"``. The benchmarks time this
    same object for the model-only rate.
    """

    def __init__(self, spec_b, weights, infos, pooling, prep, device, precision, tta="none", *,
                 compile=False, batch_size=64):
        model = codes_model(spec_b, load_model(spec_b, weights), {i.node: i.alias for i in infos}, pooling,
                            precision=precision, device_type=device.type)
        self.model = model.to(device).eval().to(memory_format=torch.channels_last)
        self.prep, self.device, self.precision, self.tta = prep, device, precision, tta
        self.batch_size = batch_size
        self.compiled = None
        self.compile_asked = False
        if compile:
            self.enable_compile(asked=True)

    def enable_compile(self, asked: bool = False) -> None:
        """Run the following batches through ``torch.compile`` (compiled at the next call).

        `asked`: the user asked for it, so a failure to compile is an error, not a warning.
        """
        self.compile_asked = self.compile_asked or asked
        if self.compiled is None and getattr(self.model, "compilable", True):
            self.compiled = torch.compile(self.model, dynamic=False)

    def _call(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.compiled is None:
            return self.model(x)
        n = x.shape[0]
        if n < self.batch_size:  # same shape every call: one compilation
            x = torch.cat([x, x.new_zeros((self.batch_size - n, *x.shape[1:]))])
        try:
            out = self.compiled(x.contiguous(memory_format=torch.channels_last))
        except Exception as exc:  # noqa: BLE001 - inductor needs a C++ compiler and more
            if not self.compile_asked:  # compile="auto" chose it: carry on eagerly
                warnings.warn(f"torch.compile failed on this machine ({type(exc).__name__}: {str(exc)[:200]}); "
                              f"extracting without it (the codes are the same). Pass compile=False "
                              f"(--no-compile) to skip the attempt.", stacklevel=2)
                self.compiled = None
                return self.model(x[:n])
            raise CnnCodesError(
                f"torch.compile failed on this machine ({type(exc).__name__}: {str(exc)[:200]}). "
                f"Run without it (compile=False, or --no-compile); the codes are the same."
            ) from exc
        return {k: v[:n] for k, v in out.items()}

    @torch.inference_mode()
    def __call__(self, batch) -> dict[str, np.ndarray]:
        if self.prep.resize == "device":
            batch = resize_batch(batch, self.prep, self.device)
        x = self.prep.normalize(batch.to(self.device, non_blocking=True), torch.channels_last)
        if self.tta == "mirror":
            x = x.flip(3).contiguous(memory_format=torch.channels_last)
        out = self._call(x)
        if self.tta == "flip":
            mirror = self._call(x.flip(3).contiguous(memory_format=torch.channels_last))
            out = {a: (t + mirror[a]) / 2 for a, t in out.items()}
        return {a: t.cpu().numpy() for a, t in out.items()}
