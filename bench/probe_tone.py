"""Does the long-clip benchmark's model learn the needle's tone? A short training run (CPU-sized
by default) that scores the needle's tone and its colour and shape separately as it trains.

    python bench/probe_tone.py --steps 400 --modalities audio             # audio alone
    python bench/probe_tone.py --steps 400 --modalities audio --audio-shift -13.8155
    python bench/probe_tone.py --steps 600 --tasks needle                 # video and audio
    python bench/probe_tone.py --steps 20 --eval-every 10 --out /tmp/p    # a quick check
    python bench/probe_tone.py --steps 300 --modalities audio --audio-noise 0.03 --audio-floor 0.1

The model is `mmsparse.eval.longbench`'s (``--small``: width 64, 2 + 2 layers, as fast on 2 CPU
cores as a probe needs), trained on clips of ``--frames`` frames of the chosen tasks drawn on the
fly, with the benchmark's loss and learning-rate schedule; every ``--eval-every`` steps it is
scored by multiple choice on a held-out set of needle clips, and the tone of the chosen answer
and its colour and shape are counted apart. ``--audio-shift`` replaces the log-mel shift of the
model's audio normalisation (the benchmark's, ``longtasks.AUDIO_NORM``: -8, the task clips' noise
floor; ``encoders.patch.AUDIO_NORM``'s log 1e-6 = -13.8155 is digital silence); ``--audio-floor Q``
shifts it by each clip's own floor per band instead (``ModelConfig.audio_floor``), and
``--audio-noise`` sets the hiss's amplitude (``TaskSpec.audio_noise``, 0.003). Writes ``probe-<device>-<date>-tone[-<label>].json``
(every evaluation, the arguments, the seed) and prints one JSON line per evaluation.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import device_name, environment, out_folder, result_stem, slug  # noqa: E402

SMALL = dict(embed_dim=64, depth=2, num_heads=2, dec_dim=64, dec_heads=2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="needle", help="comma list of the tasks trained on (needle is scored)")
    p.add_argument("--frames", type=int, default=64)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-clips", type=int, default=48, help="held-out needle clips")
    p.add_argument("--modalities", default="video,audio")
    p.add_argument("--audio-shift", type=float, default=None,
                   help="log-mel shift of the audio normalisation (default: the benchmark's, "
                        "longtasks.AUDIO_NORM, the clips' noise floor; -13.8155 = log 1e-6, digital silence)")
    p.add_argument("--audio-floor", type=float, default=None,
                   help="shift by each clip's noise floor per band, this quantile over time (e.g. 0.1)")
    p.add_argument("--audio-noise", type=float, default=None,
                   help="amplitude of the clips' background hiss (default: TaskSpec's, 0.003)")
    p.add_argument("--full", action="store_true", help="the benchmark's model (default: --small's)")
    p.add_argument("--arm", default="dense")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--label", default="")
    p.add_argument("--out", default=None, help="result folder (default bench/results)")
    args = p.parse_args(argv)

    import numpy as np
    import torch

    from mmsparse.data import longtasks as lt
    from mmsparse.eval import longbench as lb

    tasks = [t for t in args.tasks.split(",") if t]
    modalities = tuple(m for m in args.modalities.split(",") if m)
    try:
        for t in tasks:
            lt.check_task(t)
        lb.check_arms([args.arm])
    except ValueError as err:
        raise SystemExit(f"--tasks / --arm: {err}")
    if set(modalities) - {"video", "audio"} or not modalities:
        raise SystemExit(f"--modalities must be video, audio or both, got {args.modalities!r}")
    if min(args.steps, args.batch, args.eval_every, args.eval_clips) < 1:
        raise SystemExit("--steps, --batch, --eval-every and --eval-clips must be >= 1")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model_cfg = dict(lb.BASE_MODEL, **({} if args.full else SMALL), modalities=modalities,
                     required_modalities=modalities[:1])
    norm = lt.AUDIO_NORM if args.audio_shift is None else (args.audio_shift, lt.AUDIO_NORM[1])
    model_cfg["audio_norm"] = norm
    if args.audio_floor is not None:
        if not 0 < args.audio_floor < 1:
            raise SystemExit(f"--audio-floor must be a quantile in (0, 1), got {args.audio_floor}")
        model_cfg["audio_floor"] = args.audio_floor
    try:
        task = lt.TaskSpec() if args.audio_noise is None else lt.TaskSpec(audio_noise=args.audio_noise)
    except ValueError as err:
        raise SystemExit(f"--audio-noise: {err}")
    spec = lb.BenchSpec(batch=args.batch, steps=args.steps, warmup=min(30, args.steps), model=model_cfg, task=task)
    model = lb.build_model(spec, args.arm, args.seed, device)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.05, betas=(0.9, 0.98))
    rng = np.random.default_rng(args.seed)
    held_out = lt.balanced_plans("needle", args.frames, args.eval_clips, spec.eval_seed, spec.task)
    points, t0 = [], time.perf_counter()
    for step in range(args.steps):
        plans = [lt.plan(tasks[i % len(tasks)], args.frames, rng, spec.task) for i in range(spec.batch)]
        batch = lt.render(plans, spec.task, device, seed=int(rng.integers(2 ** 31)))
        loss = lb.train_step(spec, model, opt, batch, step, args.steps)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            rows = lb.score(model, held_out, spec, device, spec.eval_seed, greedy=False)
            point = {"step": step + 1, "loss": round(float(loss), 4),
                     "needle": float(np.mean([r["choice_correct"] for r in rows])),
                     "tone": float(np.mean([r["choice"].split()[3] == r["truth"].split()[3] for r in rows])),
                     "colour_shape": float(np.mean([r["choice"].split()[1:3] == r["truth"].split()[1:3]
                                                    for r in rows])),
                     "seconds": round(time.perf_counter() - t0, 1)}
            points.append(point)
            print(json.dumps(point), flush=True)
    stem = result_stem(out_folder(args.out), "probe", slug(device_name(device)),
                       "tone" + (f"-{args.label}" if args.label else ""))
    path = stem.with_name(stem.name + ".json")
    path.write_text(json.dumps({"env": environment(device), "args": vars(args), "audio_norm": list(norm),
                                "audio_floor": args.audio_floor, "audio_noise": task.audio_noise,
                                "model": model_cfg, "points": points}, indent=1))
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
