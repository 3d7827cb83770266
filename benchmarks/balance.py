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
    python benchmarks/balance.py --tab-headroom   # the second setting: balance_tab.json
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

# `--tab-headroom`: a second setting with a more informative tab view. In the setting above
# the tab branch's probe in the plain fused model already matches its view trained alone,
# so balancing has nothing to recover there. The tab view's settings are tried in order
# (the closest to the setting above first: less noise, then a wider projection); the first
# one kept has, on the validation split (seed 0): the tab view alone at least HEADROOM
# above the plain fused model's tab probe (something to recover), and at least LEFT_MARGIN
# below the left view alone (the left view stays much the easiest).
TAB_OUT = os.path.join(mm.HERE, "balance_tab.json")
TAB_SETTINGS = (
    {"tab_dims": 6, "tab_noise": 0.3},
    {"tab_dims": 6, "tab_noise": 0.2},
    {"tab_dims": 6, "tab_noise": 0.1},
    {"tab_dims": 12, "tab_noise": 0.4},
    {"tab_dims": 24, "tab_noise": 0.4},
)
HEADROOM = 0.03
LEFT_MARGIN = 0.10


def probe(model, views, y, parts, on="test"):
    """Each branch's linear-probe accuracy on its frozen features (fit rows -> `on` rows)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    fit, val, test = parts
    test = val if on == "validation" else test
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


def pm(ms):
    return f"{ms[0]:.3f} ± {ms[1]:.3f}"


def variant_table(s):
    """The variants' table and the targets' table, as markdown lines."""
    lines = [
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
    return lines


def render(data):
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
    ]
    lines += variant_table(s)
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
            "and that target is missed by a change within the seeds' spread (the next "
            "section looks for a tab view with a deficit to recover, in five more "
            "informative settings, and finds none). OGM's "
            "gradient modulation adds nothing measurable on top of the auxiliary losses on "
            "this data (it slows the left branch, coefficient about 0.65 by the end, and the "
            "right branch's probe ends between the two).",
        ]
    return "\n".join(lines)


def choose_tab_setting(epochs, log):
    """The second setting's tab view, chosen on the validation split only (seed 0)."""
    trials, chosen = [], None
    left = None
    for setting in TAB_SETTINGS:
        views, y = mm.make_views({**mm.CORRUPTION, **setting})
        parts = mm.split(y)
        if left is None:  # the left view does not depend on the tab view
            model, _, _ = mm.train(("left",), views, y, parts, 0, epochs)
            left = mm.accuracy(model, ("left",), views, y, parts[1])
        model, _, _ = mm.train(("tab",), views, y, parts, 0, epochs)
        alone = mm.accuracy(model, ("tab",), views, y, parts[1])
        fused, _, _ = mm.train(mm.MODALITIES, views, y, parts, 0, epochs)
        tab_probe = probe(fused, views, y, parts, on="validation")["tab"]
        ok = alone - tab_probe >= HEADROOM and alone <= left - LEFT_MARGIN
        trials.append({**setting, "tab_alone": alone, "tab_probe": tab_probe, "kept": ok})
        log(
            f"{setting}: validation tab alone {alone:.3f}, fused tab probe "
            f"{tab_probe:.3f}, left alone {left:.3f}{'  -> kept' if ok else ''}"
        )
        if ok:
            chosen = setting
            break
    return chosen, left, trials


def run_tab(seeds, epochs, log):
    """The `--tab-headroom` run: choose the tab view, then the variants and references."""
    setting, left_val, trials = choose_tab_setting(epochs, log)
    data = {"trials": trials, "left_validation": left_val, "tab_setting": setting}
    if setting is None:
        return data
    views, y = mm.make_views({**mm.CORRUPTION, **setting})
    parts = mm.split(y)
    rows, alone = [], {m: [] for m in mm.MODALITIES}
    for seed in seeds:
        for m in mm.MODALITIES:
            model, _, _ = mm.train((m,), views, y, parts, seed, epochs)
            alone[m].append(mm.accuracy(model, (m,), views, y, parts[2]))
        log(f"seed {seed} alone: " + " ".join(f"{m} {a[-1]:.3f}" for m, a in alone.items()))
        rows.append(run_seed(seed, views, y, parts, epochs, log))
    data.update(
        seeds=rows,
        alone={m: mm.mean_std(a) for m, a in alone.items()},
        summary=summarise(rows),
    )
    return data


def render_tab(data):
    lines = [
        "## Branch balance, second setting: a more informative tab view",
        "",
        f"Written by `python benchmarks/balance.py --tab-headroom` on {data['date']}: "
        f"{data['machine']}; {data['versions']}; whole run {data['total_s'] / 60:.1f} min. "
        "In the setting above the tab branch's probe in the plain fused model is already "
        "at what the tab view gives alone, so balancing has nothing to recover for it. "
        "Here the tab view is made more informative (everything else as above): the "
        "settings below are tried in order, less noise first, then a wider projection, "
        "and the first is kept where, on the validation split (seed 0; the test split "
        f"plays no part), the tab view trained alone is at least {HEADROOM} above the plain "
        f"fused model's tab probe and at least {LEFT_MARGIN} below the left view alone "
        "(left stays much the easiest):",
        "",
        "| tab dims | tab noise | tab alone (validation) | fused tab probe (validation) | "
        "left alone (validation) | kept |",
        "|---|---|---|---|---|---|",
    ]
    for t in data["trials"]:
        lines.append(
            f"| {t['tab_dims']} | {t['tab_noise']} | {t['tab_alone']:.3f} | "
            f"{t['tab_probe']:.3f} | {data['left_validation']:.3f} | "
            f"{'yes' if t['kept'] else 'no'} |"
        )
    setting = data["tab_setting"]
    if setting is None:
        gaps = [t["tab_alone"] - t["tab_probe"] for t in data["trials"]]
        lines += [
            "",
            "No setting qualified, so there is no second table: in every one, from a tab "
            f"view worth {min(t['tab_alone'] for t in data['trials']):.3f} alone to one "
            f"worth {max(t['tab_alone'] for t in data['trials']):.3f}, the plain fused "
            "model's tab branch is already at what the view gives alone (tab alone minus "
            f"fused probe between {min(gaps):+.3f} and {max(gaps):+.3f}). The small MLP on "
            "the tab view trains as fast inside the fused model as alone; the "
            "under-trained branch on this data is the right view's CNN, which the "
            "auxiliary losses lift (above).",
        ]
        return "\n".join(lines)
    alone = data["alone"]
    lines += [
        "",
        f"With the tab view projected to {setting['tab_dims']} dims, noise "
        f"{setting['tab_noise']}: single-branch models (each view trained "
        "alone, test) "
        + ", ".join(f"{m} {pm(alone[m])}" for m in mm.MODALITIES)
        + f"; mean ± std over seeds {', '.join(map(str, data['seed_values']))}.",
        "",
    ]
    lines += variant_table(data["summary"])
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="one seed, writes nothing")
    parser.add_argument("--epochs", type=int, default=mm.MAX_EPOCHS)
    parser.add_argument("--render", action="store_true", help="rewrite the markdown only")
    parser.add_argument(
        "--tab-headroom",
        action="store_true",
        help="the second setting (a less noisy tab view): balance_tab.json + its section",
    )
    args = parser.parse_args()
    if args.render:
        from _marked import write_section

        if args.tab_headroom:
            write_section(mm.MARKDOWN, "balance_tab", render_tab(json.load(open(TAB_OUT))))
        else:
            write_section(mm.MARKDOWN, "balance", render(json.load(open(OUT))))
        return
    mm.set_threads(args.threads)
    seeds = mm.SEEDS[:1] if args.quick else mm.SEEDS
    if args.tab_headroom:
        start = time.perf_counter()
        data = {
            **mm.environment(args.threads),
            "epochs": args.epochs,
            "seed_values": list(seeds),
            **run_tab(seeds, args.epochs, lambda t: print(t, flush=True)),
            "total_s": time.perf_counter() - start,
        }
        mm.publish(data, TAB_OUT, "balance_tab", render_tab(data), args.quick)
        return
    views, y = mm.make_views(mm.CORRUPTION)
    parts = mm.split(y)
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
