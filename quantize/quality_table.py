"""Measure quantization quality on stories260K and print a Markdown table.

    python quantize/quality_table.py [--shared ../shared] [--out table.md]

For 8, 6, 4 and 3 bits at group sizes 32 and 64, the float model is quantized
with GPTQ (calibrated on the second half of the TinyStories sample) and
evaluated on the first 64 windows of 256 tokens of the same file (the
protocol of stories260K's reference perplexity, 4.6156). Each quantization
report also carries plain rounding's figures on the same plan, so each row
compares both methods on identical layers.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from mlxbastion.convert import convert
from mlxbastion.quantization import QuantizeOptions, quantize

SETTINGS = [(bits, group) for group in (32, 64) for bits in (8, 6, 4, 3)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    root = Path(__file__).resolve().parents[1]
    parser.add_argument("--shared", type=Path, default=root.parent / "shared")
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args()

    text = (args.shared / "data/tinystories/tinystories_val_sample.txt").read_text()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # Separate calibration from evaluation text: the eval windows come
        # from the start of the file, calibration from its second half.
        (tmp / "eval.txt").write_text(text)
        (tmp / "calibration.txt").write_text(text[len(text) // 2 :])
        float_model = convert(args.shared / "models/stories260K/hf", tmp / "float")

        rows = []
        for bits, group in SETTINGS:
            options = QuantizeOptions(
                bits=bits,
                group_size=group,
                method="gptq",
                calibration_data=str(tmp / "calibration.txt"),
                calibration_tokens=8192,
                eval_data=str(tmp / "eval.txt"),
                eval_tokens=64 * 256,
                sequence_length=256,
            )
            report = quantize(float_model, tmp / f"q{bits}g{group}", options)
            rows.append(_row(bits, group, report))

    table = "\n".join(HEADER + rows)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


HEADER = [
    "| bits | group | bits/weight | size (KB) | float ppl | RTN ppl (gap) "
    "| GPTQ ppl (gap) | RTN KL | GPTQ KL |",
    "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
]


def _row(bits: int, group: int, report: dict) -> str:
    e = report["evaluation"]
    base = e["float_perplexity"]

    def gap(ppl: float) -> str:
        return f"{ppl:.4f} ({100 * (ppl / base - 1):+.2f}%)"

    return (
        f"| {bits} | {group} | {report['bits_per_weight']:.2f} "
        f"| {report['size_bytes'] / 1e3:.0f} | {base:.4f} "
        f"| {gap(e['rtn_perplexity'])} | {gap(e['perplexity'])} "
        f"| {e['rtn_mean_kl']:.4f} | {e['mean_kl']:.4f} |"
    )


if __name__ == "__main__":
    main()
