#!/usr/bin/env python3
"""Rewrites candle-core 0.11.1's `src/backprop.rs` so that the first gradient
reaching a node is stored as it is.

candle accumulates every op input's gradient as

    let sum_grad = grads.or_insert(arg)?;   // a new tensor of zeros
    *sum_grad = sum_grad.add(&arg_grad)?;   // zeros + gradient, a new tensor

so each input of each op costs a zero fill and a full-size add even when the
input has one consumer (nearly always). The rewrite turns each such pair
into `grads.accumulate(arg, &arg_grad)?`, which stores the gradient when the
slot is empty and adds to it otherwise. Values are unchanged (0 + g == g);
with several consumers the sums can run in another order, which moves the
last bits of second-order gradients. Upstream proposals of the same change:
huggingface/candle pull requests 3578 and 3822 (open).

Usage:
  patch_candle_backprop.py DEST     copy candle-core 0.11.1 from cargo's
                                    registry (as Cargo.lock pins it) into
                                    DEST, and patch the copy
  patch_candle_backprop.py --check  only check that the rewrite applies
"""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

VERSION = "0.11.1"
# Pairs rewritten in 0.11.1: any other count means another candle source.
EXPECTED_REWRITES = 41

ACCUMULATE = '''    /// Adds `grad` to the gradient stored for `tensor`, or stores `grad`
    /// itself when there is none yet (no zero tensor to add it to).
    fn accumulate(&mut self, tensor: &Tensor, grad: &Tensor) -> Result<()> {
        match self.0.entry(tensor.id()) {
            Entry::Occupied(mut stored) => {
                let sum = stored.get().add(grad)?;
                stored.insert(sum);
            }
            Entry::Vacant(slot) => {
                slot.insert(grad.contiguous()?);
            }
        }
        Ok(())
    }

'''

# `let NAME = grads.or_insert(ARG)?;` followed by `*NAME = NAME.add(EXPR)?`
# (with or without a semicolon) on the next line.
PAIR = re.compile(
    r"let (?P<name>\w+) = grads\.or_insert\((?P<arg>[\w.]+)\)\?;\s*\n"
    r"\s*\*(?P=name) = (?P=name)\.add\((?P<expr>.+)\)\?(?P<semi>;?)\n"
)


def rewritten(match: re.Match) -> bool:
    # A gradient computed from the stored sum itself (a broadcast to its
    # shape) needs the slot first: left as it is.
    return match["name"] not in match["expr"]


def rewrite(match: re.Match) -> str:
    if not rewritten(match):
        return match[0]
    return f"grads.accumulate({match['arg']}, {match['expr']})?{match['semi']}\n"


def registry_crate() -> Path:
    """candle-core's source folder in cargo's registry, as Cargo.lock pins it."""
    metadata = subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--locked"],
        check=True,
        capture_output=True,
        text=True,
    )
    versions = [
        p for p in json.loads(metadata.stdout)["packages"] if p["name"] == "candle-core"
    ]
    found = [p for p in versions if p["version"] == VERSION]
    if not found:
        listed = ", ".join(p["version"] for p in versions) or "none"
        sys.exit(f"Cargo.lock has candle-core {listed}; this patch is written for {VERSION}")
    return Path(found[0]["manifest_path"]).parent


def patched(source: Path) -> str:
    """The text of `source` (candle-core's backprop.rs), rewritten."""
    text = source.read_text()
    if "fn accumulate(" in text:
        sys.exit(f"{source}: already patched")
    rewrites = sum(rewritten(m) for m in PAIR.finditer(text))
    text = PAIR.sub(rewrite, text)
    if rewrites != EXPECTED_REWRITES:
        sys.exit(f"{source}: rewrote {rewrites} gradient additions, expected {EXPECTED_REWRITES}")
    anchor = "    fn or_insert(&mut self, tensor: &Tensor) -> Result<&mut Tensor> {"
    if text.count(anchor) != 1:
        sys.exit(f"{source}: GradStore::or_insert not found")
    return text.replace(anchor, ACCUMULATE + anchor)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    crate = registry_crate()
    if sys.argv[1] == "--check":
        patched(crate / "src" / "backprop.rs")
        print(f"{crate}: the rewrite of {EXPECTED_REWRITES} gradient additions applies")
        return
    dest = Path(sys.argv[1])
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(crate, dest)
    for path in [dest, *dest.rglob("*")]:
        path.chmod(path.stat().st_mode | 0o200)  # registry files are read-only
    source = dest / "src" / "backprop.rs"
    source.write_text(patched(source))
    print(f"{dest}: a copy of {crate} whose backward stores first gradients")


if __name__ == "__main__":
    main()
