"""Branch balance: fused models without and with auxiliary losses and OGM, on three-view digits.

The data, split and recipe of `multimodal.py` (left half / noisy occluded right half / noisy
6-dim projection of scikit-learn's digits; the left view is much easier than the others).
Per seed it trains three fused models (concat fusion, all modalities present):

  * "fused": the plain fused model;
  * "fused + auxiliary losses": `aux_loss_weight=0.5` (loss fusion, one head per branch);
  * "fused + auxiliary losses + OGM": `balance="ogm"` too (gradient modulation).

and scores each on the test split: the fused accuracy, and each branch's unimodal accuracy
measured the same way for every model: a linear probe (scikit-learn's multinomial logistic
regression) fitted on the frozen branch features of the training rows (validation rows
excluded) and scored on the test rows. The targets: with balancing, the weaker branches'
unimodal accuracy rises, and the fused accuracy does not fall.

    python benchmarks/balance.py            # 3 seeds, 1 thread: balance.json + MULTIMODAL.md
    python benchmarks/balance.py --quick    # 1 seed, writes nothing
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import multimodal as mm  # noqa: E402
import numpy as np  # noqa: E402

OUT = os.path.join(mm.HERE, "balance.json")
VARIANTS = [
    {"name": "fused", "kwargs": {}},
    {"name": "fused + auxiliary losses", "kwargs": {"aux_loss_weight": 0.5}},
    {
        "name": "fused + auxiliary losses + OGM",
        "kwargs": {"aux_loss_weight": 0.5, "balance": "ogm"},
    },
]
REFERENCE = "fused"
WEAK = ("right", "tab")  # the weaker modalities (unimodal validation 0.73 / 0.51 vs 0.92)


def probe(model, views, y, parts):
    """Each branch's linear-probe test accuracy on its frozen features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    fit, _, test = parts
    extractor = model.branch_features()
    out = {}
    feats_fit = extractor.predict(mm.feed(mm.MODALITIES, views, fit), verbose=0)
    feats_test = extractor.predict(mm.feed(mm.MODALITIES, views, test), verbose=0)
    for m, f_fit, f_test in zip(mm.MODALITIES, feats_fit, feats_test):
        scaler = StandardScaler().fit(f_fit)
        clf = LogisticRegression(max_iter=2000).fit(scaler.transform(f_fit), y[fit])
        out[m] = float(clf.score(scaler.transform(f_test), y[test]))
    return out


def run_seed(seed, views, y, parts, epochs, log):
    row = {}
    for variant in VARIANTS:
        model, wall, ep = mm.train(mm.MODALITIES, views, y, parts, seed, epochs, variant["kwargs"])
        fused = mm.accuracy(model, mm.MODALITIES, views, y, parts[2])
        probes = probe(model, views, y, parts)
        aux = None
        if variant["kwargs"].get("aux_loss_weight"):
            import kfusion as kf

            report = kf.inspect.branch_accuracy(
                model, mm.feed(mm.MODALITIES, views, parts[2]), y[parts[2]]
            )
            aux = {m: report["branches"][f"{m}_{'mlp' if m == 'tab' else 'cnn'}"] for m in probes}
        coefficients = None
        if variant["kwargs"].get("balance"):
            layer = model.get_layer("gradient_modulation")
            coefficients = [float(c) for c in np.asarray(layer.coefficients)]
        row[variant["name"]] = {
            "fused": fused,
            "probe": probes,
            "aux": aux,
            "coefficients": coefficients,
            "wall_s": wall,
            "epochs": ep,
        }
        log(
            f"seed {seed} {variant['name']}: fused {fused:.3f} probe "
            + " ".join(f"{m} {a:.3f}" for m, a in probes.items())
            + (f" aux {aux}" if aux else "")
            + (f" k {np.round(coefficients, 3).tolist()}" if coefficients else "")
            + f"  {wall:.1f}s {ep} epochs"
        )
    return row


def summarise(rows):
    out = {}
    for variant in VARIANTS:
        name = variant["name"]
        r = [row[name] for row in rows]
        out[name] = {
            "fused": mm.mean_std([x["fused"] for x in r]),
            "probe": {m: mm.mean_std([x["probe"][m] for x in r]) for m in mm.MODALITIES},
            "aux": (
                {m: mm.mean_std([x["aux"][m] for x in r]) for m in mm.MODALITIES}
                if r[0]["aux"]
                else None
            ),
            "coefficients": [x["coefficients"] for x in r],
            "wall_s": mm.mean_std([x["wall_s"] for x in r]),
            "epochs": mm.mean_std([x["epochs"] for x in r]),
        }
    targets = []
    ref = out[REFERENCE]
    for name, v in out.items():
        if name == REFERENCE:
            continue
        for m in WEAK:
            gain = v["probe"][m][0] - ref["probe"][m][0]
            targets.append(
                {
                    "variant": name,
                    "target": f"{m} branch's probe accuracy rises",
                    "value": f"{v['probe'][m][0]:.3f} ({gain:+.3f})",
                    "met": bool(gain > 0),
                }
            )
        drop = v["fused"][0] - ref["fused"][0]
        targets.append(
            {
                "variant": name,
                "target": "fused accuracy does not fall",
                "value": f"{v['fused'][0]:.3f} ({drop:+.3f})",
                "met": bool(drop >= 0),
            }
        )
    return {"variants": out, "targets": targets}


def render(data):
    def pm(ms):
        return f"{ms[0]:.3f} ± {ms[1]:.3f}"

    s = data["summary"]
    lines = [
        "## Branch balance (three-view digits)",
        "",
        f"Written by `python benchmarks/balance.py` on {data['date']}: {data['machine']}; "
        f"{data['versions']}. Data, split and recipe as above (concat fusion, at most "
        f"{data['epochs']} epochs, early stopping on validation loss), all modalities "
        f"present; mean ± std over seeds {', '.join(map(str, data['seed_values']))}; "
        f"whole run {data['total_s'] / 60:.1f} min.",
        "",
        "Unimodal accuracy of a branch = a linear probe (multinomial logistic regression on "
        "the standardised, frozen branch features of the training rows, scored on the test "
        "rows), the same measurement for every model. For the models with auxiliary heads, "
        "the heads' own test accuracy (`kf.inspect.branch_accuracy`) is given too. "
        '`aux_loss_weight=0.5`; OGM: `balance="ogm"` (alpha 0.5, coefficients updated '
        "once an epoch from the auxiliary heads' confidence).",
        "",
        "| variant | fused | probe left | probe right | probe tab | aux head left / right / "
        "tab | last OGM coefficients (seed 0) | epochs | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        v = s["variants"][variant["name"]]
        aux = " / ".join(f"{v['aux'][m][0]:.3f}" for m in mm.MODALITIES) if v["aux"] else "-"
        k = v["coefficients"][0]
        k = " / ".join(f"{c:.2f}" for c in k) if k else "-"
        lines.append(
            f"| {variant['name']} | {pm(v['fused'])} | "
            + " | ".join(pm(v["probe"][m]) for m in mm.MODALITIES)
            + f" | {aux} | {k} | {v['epochs'][0]:.0f} | {v['wall_s'][0]:.1f} |"
        )
    lines += ["", "**Targets** (means over seeds, against the plain fused model):", ""]
    lines += ["| variant | target | value (change) | |", "|---|---|---|---|"]
    for t in s["targets"]:
        lines.append(
            f"| {t['variant']} | {t['target']} | {t['value']} | "
            f"{'met' if t['met'] else '**missed**'} |"
        )
    baselines = {}
    if os.path.exists(mm.OUT):
        summary = json.load(open(mm.OUT)).get("summary", {})
        baselines = {m: summary["baselines"][m]["test"][0] for m in mm.MODALITIES}
    if baselines:
        ref = s["variants"][REFERENCE]["probe"]
        lines += [
            "",
            "For scale, the single-branch models above (each view trained alone) reach "
            + ", ".join(f"{m} {baselines[m]:.3f}" for m in mm.MODALITIES)
            + ". In the plain fused model the right branch is under-trained (probe "
            f"{ref['right'][0]:.3f} against {baselines['right']:.3f} alone), and the "
            "auxiliary losses bring it back to about its single-branch level; the tab "
            f"branch's probe ({ref['tab'][0]:.3f}) is already at what its view gives alone "
            f"({baselines['tab']:.3f}), so there is nothing for balancing to recover there, "
            "and that target is missed by a change within the seeds' spread. OGM's "
            "gradient modulation adds nothing measurable on top of the auxiliary losses on "
            "this data (it slows the left branch, coefficient about 0.65 by the end, and the "
            "right branch's probe ends between the two).",
        ]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="one seed, writes nothing")
    parser.add_argument("--epochs", type=int, default=mm.MAX_EPOCHS)
    parser.add_argument("--render", action="store_true", help="rewrite the markdown only")
    args = parser.parse_args()
    if args.render:
        from _marked import write_section

        write_section(mm.MARKDOWN, "balance", render(json.load(open(OUT))))
        return
    mm.set_threads(args.threads)
    views, y = mm.make_views(mm.CORRUPTION)
    parts = mm.split(y)
    seeds = mm.SEEDS[:1] if args.quick else mm.SEEDS
    start = time.perf_counter()
    rows = [
        run_seed(s, views, y, parts, args.epochs, lambda t: print(t, flush=True)) for s in seeds
    ]
    data = {
        **mm.environment(args.threads),
        "epochs": args.epochs,
        "variants": VARIANTS,
        "seed_values": list(seeds),
        "seeds": rows,
        "total_s": time.perf_counter() - start,
    }
    data["summary"] = summarise(rows)
    mm.publish(data, OUT, "balance", render(data), args.quick)


if __name__ == "__main__":
    main()
