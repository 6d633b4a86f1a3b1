"""Extrapolate a run's validation accuracy to a longer training schedule.

Fits the validation error of a run directory's `metrics.jsonl` with a power
law that levels off, err(t) = a + b * t^(-c) (a, b >= 0), and predicts the
validation accuracy at a later step. The range is a parametric bootstrap:
each validation figure is redrawn as a binomial count over the validation
predictions of the run's config (episodes x ways x queries), refitted and
predicted again. It covers the measurement noise of the points, not the
chance that the curve changes shape later, so read it as a rough guide.

`--fit-until STEP` fits only the points up to STEP and prints the later
points beside the prediction: how well the method would have done on a
finished run (e.g. runs/maml-5w1s-fo).

Usage: python3 scripts/extrapolate_validation.py RUN_DIR [--to STEP]
       [--fit-until STEP] [--from STEP] [--bootstrap 2000] [--seed 0]
Standard library only.
"""

import argparse
import json
import math
import random
import sys
from pathlib import Path

EXPONENTS = [0.02 * i for i in range(1, 151)]  # c from 0.02 to 3.0


def read_run(run_dir):
    config = json.loads((run_dir / "config.json").read_text())
    points = []
    with open(run_dir / "metrics.jsonl") as metrics:
        for line_number, line in enumerate(metrics, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                sys.exit(f"{run_dir / 'metrics.jsonl'} line {line_number}: {error}")
            if record.get("val_accuracy") is not None:
                points.append((record["step"], record["val_accuracy"]))
    # A resumed run may have logged a step twice; the later record wins.
    return config, sorted(dict(points).items())


def validation_predictions(config):
    episodes = config["test_episodes"]
    return config["training"]["validation_episodes"] * episodes["ways"] * episodes["queries"]


def fit_for_exponent(steps, errors, c):
    """Least squares of err = a + b x with x = t^-c, a and b kept >= 0."""
    xs = [t ** -c for t in steps]
    n = len(xs)
    mean_x, mean_e = sum(xs) / n, sum(errors) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    b = sum((x - mean_x) * (e - mean_e) for x, e in zip(xs, errors)) / sxx if sxx > 0 else 0.0
    a = mean_e - b * mean_x
    if a < 0:  # the floor cannot be negative: fit through zero instead
        a = 0.0
        b = sum(x * e for x, e in zip(xs, errors)) / sum(x * x for x in xs)
    b = max(b, 0.0)
    sse = sum((a + b * x - e) ** 2 for x, e in zip(xs, errors))
    return sse, a, b


def fit(steps, errors):
    sse, a, b, c = min(fit_for_exponent(steps, errors, c) + (c,) for c in EXPONENTS)
    return a, b, c


def predict(curve, step):
    a, b, c = curve
    return 1.0 - (a + b * step ** -c)


def binomial(rng, n, p):
    # Normal approximation: n is thousands of predictions per validation.
    return min(max(rng.gauss(n * p, math.sqrt(n * p * (1 - p))), 0.0), n) / n


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--to", type=int, help="step to predict (default: the config's training steps)")
    parser.add_argument("--fit-until", type=int, help="fit only the points up to this step")
    parser.add_argument("--from", dest="first", type=int, default=1, help="ignore points before this step")
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    config, points = read_run(args.run_dir)
    target = args.to or config["training"]["steps"]
    fitted = [(t, acc) for t, acc in points if t >= args.first and (args.fit_until is None or t <= args.fit_until)]
    if len(fitted) < 3:
        sys.exit(f"{args.run_dir}: {len(fitted)} validation points in range; the fit needs at least 3")
    steps = [t for t, _ in fitted]
    curve = fit(steps, [1.0 - acc for _, acc in fitted])
    n = validation_predictions(config)

    rng = random.Random(args.seed)
    draws = []
    for _ in range(args.bootstrap):
        resampled = [1.0 - binomial(rng, n, predict(curve, t)) for t in steps]
        draws.append(predict(fit(steps, resampled), target))
    draws.sort()
    low, high = draws[int(0.025 * len(draws))], draws[int(0.975 * len(draws)) - 1]

    a, b, c = curve
    print(f"run: {args.run_dir} ({config['name']})")
    print(f"fitted on {len(fitted)} validation points, steps {steps[0]}-{steps[-1]}, {n} predictions each")
    print(f"validation error = {a:.4f} + {b:.4f} * step^-{c:.2f}")
    for t, acc in points:
        mark = "" if (t, acc) in fitted else "   (not fitted)"
        print(f"  step {t:>6}: measured {100 * acc:6.2f}%  curve {100 * predict(curve, t):6.2f}%{mark}")
    print(f"predicted validation accuracy at step {target}: {100 * predict(curve, target):.2f}% "
          f"(bootstrap 95% range {100 * low:.2f}-{100 * high:.2f}%)")
    print(f"levelling off at {100 * (1 - a):.2f}%")


if __name__ == "__main__":
    main()
