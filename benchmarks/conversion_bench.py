"""Dataset conversion: streaming writer vs building the dataset in memory; WSI tiling with 1 vs 2 workers.

    python benchmarks/conversion_bench.py                    # defaults: 300 and 1200 SRH patches, 300x300
    python benchmarks/conversion_bench.py --sizes 500 2000 --skip-wsi

1. OpenSRH-layout TIFFs (2-channel uint16, 300x300, SRH-like texture from dataset_scripts/demo.py) are converted
   by ``dataset_scripts/opensrh.py`` (rows streamed into one Arrow file per split, then ``save_to_disk``) and by
   the obvious alternative (``Dataset.from_list`` of every row, then ``save_to_disk``). Each cell runs in a
   fresh process; "extra MiB" is the peak RSS minus the RSS before conversion. Both outputs are checked to hold
   the same arrays.
2. ``../shared/data/cmu_small_region.svs`` is tiled by ``dataset_scripts/wsi.py`` at 128 px (level 0) with
   1 and 2 worker processes, as four slides (skipped when the slide is absent).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SLIDE = REPO.parent / "shared" / "data" / "cmu_small_region.svs"


def status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: now; VmHWM: peak of this process image), in MiB."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


class AnonPeak:
    """Peak of RssAnon (anonymous memory: heap, Arrow buffers) sampled every 10 ms in a background thread.

    VmHWM also counts the file pages of memory-mapped files the process reads (page cache the kernel can drop),
    e.g. the Arrow file ``save_to_disk`` copies; the anonymous peak is the memory a conversion really holds.
    """

    def __init__(self) -> None:
        import threading

        self.peak, self._stop = status_mib("RssAnon"), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, status_mib("RssAnon"))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, status_mib("RssAnon"))


def make_release(root: Path, num_patches: int) -> None:
    """An OpenSRH-layout release of ``num_patches`` 300x300 patches (8 per slide, 2 slides per patient)."""
    import numpy as np
    import tifffile

    sys.path.insert(0, str(REPO))
    from hlss_hf.data.demo import _class_params, _render_patch

    rng = np.random.default_rng(0)
    # A handful of rendered patches, cycled with small shifts: rendering is not what is measured.
    drawn = dict(coverage=0.2, darkness=0.8, stroma=0.7, fibre_angle=0.3, fibre_freq=0.3, brightness=0.95)
    stain = np.ones((2, 2), np.float32)
    bank = [_render_patch(rng, 300, {**_class_params(i % 3, 3), **drawn}, stain, "srh")[0] for i in range(12)]
    meta, split = {}, {"train": [], "val": []}
    for index in range(num_patches):
        patient, slide = f"P{index // 16:04d}", f"P{index // 16:04d}-{(index // 8) % 2}"
        rel = f"studies/{patient}/{slide}/{index:06d}.tif"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(root / rel, np.moveaxis(np.roll(bank[index % 12], index, axis=1), -1, 0))
        record = meta.setdefault(patient, {"class": ["hgg", "lgg", "mening"][index // 16 % 3], "slides": {}})
        record["slides"].setdefault(
            slide, {"tumor_patches": [], "normal_patches": [], "nondiagnostic_patches": []}
        )
        record["slides"][slide]["tumor_patches"].append(rel)
    for i, patient in enumerate(sorted(meta)):
        split["val" if i % 5 == 4 else "train"].append(patient)
    (root / "meta").mkdir(exist_ok=True)
    (root / "meta" / "opensrh.json").write_text(json.dumps(meta))
    (root / "meta" / "train_val_split.json").write_text(json.dumps(split))


def cell(method: str, root: str, out: str, extra: list[str]) -> dict:
    """Run one measurement in this (fresh) process."""
    sys.path.insert(0, str(REPO))
    import datasets  # noqa: F401  (imported before the baseline RSS is taken)

    from dataset_scripts import opensrh, wsi

    before, anon_before = status_mib("VmRSS"), status_mib("RssAnon")
    anon = AnonPeak()
    start = time.perf_counter()
    if method == "streaming":
        summary = opensrh.main([root, "--output_dir", out, "--progress", "false"])
        rows = sum(summary.totals(s)["patches"] for s in summary.counts)
    elif method == "in-memory":
        from hlss_hf.data.schema import OPENSRH_CLASSES, features_for
        from hlss_hf.data.writer import UNKNOWN_PROVENANCE, InvalidItems

        meta = json.loads((Path(root) / "meta/opensrh.json").read_text())
        split_map = json.loads((Path(root) / "meta/train_val_split.json").read_text())
        invalid = InvalidItems()
        plan = opensrh.plan_opensrh(Path(root), meta, split_map, list(OPENSRH_CLASSES), False, invalid)
        features = features_for("srh", OPENSRH_CLASSES, patch_size=300)
        names = features["label"].names
        splits = {}
        for split, patches in plan.items():
            if patches:
                rows_ = [
                    {**UNKNOWN_PROVENANCE, **row, "label": names.index(row["label"])}
                    for row in opensrh.iter_rows(patches, (300, 300), invalid)
                ]
                splits[split] = datasets.Dataset.from_list(rows_, features=features)
                del rows_
        datasets.DatasetDict(splits).save_to_disk(out)
        rows = sum(len(ds) for ds in splits.values())
    else:  # wsi tiling
        manifest = Path(out).parent / "manifest.csv"
        # Four copies of the region as four slides, so that two workers have slides to share.
        lines = [f"{SLIDE},P{i},skin,train,cmu-{i}" for i in range(4)]
        manifest.write_text("slide_path,patient_id,label,split,slide_id\n" + "\n".join(lines) + "\n")
        summary = wsi.main(["--manifest", str(manifest), "--output_dir", out, "--progress", "false", *extra])
        rows = summary.totals("train")["patches"]
    seconds = time.perf_counter() - start
    anon_peak = anon.stop()
    # Not ru_maxrss: Linux carries the parent's high-water mark into a vfork+exec child.
    peak = status_mib("VmHWM")
    import pyarrow as pa

    arrow_peak = pa.default_memory_pool().max_memory() / 2**20
    return {
        "rows": rows,
        "seconds": seconds,
        "extra_mib": peak - before,
        "extra_anon_mib": anon_peak - anon_before,
        "arrow_peak_mib": arrow_peak,
    }


def run_cell(method: str, root: Path, out: Path, extra: list[str] | None = None) -> dict:
    command = [sys.executable, __file__, "--cell", method, str(root), str(out), json.dumps(extra or [])]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[300, 1200], help="numbers of SRH patches")
    parser.add_argument("--skip-wsi", action="store_true")
    parser.add_argument("--cell", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        method, root, out, extra = args.cell
        with open(os.devnull, "w") as devnull:  # the converters print summaries; keep stdout for the JSON
            stdout, sys.stdout = sys.stdout, devnull
            try:
                measured = cell(method, root, out, json.loads(extra))
            finally:
                sys.stdout = stdout
        print(json.dumps(measured))
        return

    import datasets
    import numpy as np

    print(
        "| patches | raw MiB | streaming s | streaming extra MiB (anon) | streaming arrow peak MiB | in-memory s "
        "| in-memory extra MiB (anon) | time in-mem/stream | anon mem in-mem/stream |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            make_release(tmp / "release", size)
            stream = run_cell("streaming", tmp / "release", tmp / "stream")
            memory = run_cell("in-memory", tmp / "release", tmp / "memory")
            a = datasets.load_from_disk(str(tmp / "stream"))["train"].with_format("numpy")
            b = datasets.load_from_disk(str(tmp / "memory"))["train"].with_format("numpy")
            assert np.array_equal(a[0]["image"], b[0]["image"]), "the two methods wrote different arrays"
            raw = size * 300 * 300 * 2 * 2 / 2**20
            print(
                f"| {size} | {raw:.0f} | {stream['seconds']:.1f} | "
                f"{stream['extra_mib']:.0f} ({stream['extra_anon_mib']:.0f}) | {stream['arrow_peak_mib']:.0f} | "
                f"{memory['seconds']:.1f} | {memory['extra_mib']:.0f} ({memory['extra_anon_mib']:.0f}) | "
                f"{memory['seconds'] / stream['seconds']:.2f} | "
                f"{memory['extra_anon_mib'] / stream['extra_anon_mib']:.1f} |"
            )
    if args.skip_wsi or not SLIDE.is_file():
        return
    print("\n| WSI workers | tiles | seconds | tiles/s |\n|---:|---:|---:|---:|")
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            res = run_cell(
                "wsi", Path(tmp), Path(tmp) / "out", ["--patch-size", "128", "--num-workers", str(workers)]
            )
            print(
                f"| {workers} | {res['rows']} | {res['seconds']:.1f} | {res['rows'] / res['seconds']:.0f} |"
            )


if __name__ == "__main__":
    main()
