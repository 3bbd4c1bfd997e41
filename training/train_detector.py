"""Train the street-scene detector on GTSDB; every epoch logs its training loss and the validation
frames' precision, recall and AP@0.5.

    python -m training.train_detector                       # same as: python -m training.train --model detector
    make train MODEL=detector EPOCHS=18                     # Slurm when `sbatch` is on the PATH

Training frames are GTSDB 00000-00499, validation frames 00500-00599 (`models.gtsdb.VAL_FRAMES`).
Outputs and resume are the classifiers' (training.loop): <name>.pt rewritten atomically after every
epoch, <name>.metrics.csv, <name>.log, <name>.state.pt for --resume; SIGUSR1/SIGTERM stop at the next
batch with exit status 99.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from models.architectures import count_parameters
from models.checkpoint import make_checkpoint, unwrap
from models.detector import GROUPS, SignDetector, detect
from models.paths import checkpoint_dir, default_data_root
from models.preprocessing import Preprocessing, normalize
from training.detection_data import PASTE_WIDTHS, SCALE_RANGE, CropSampler, load_paste_signs
from training.detection_metrics import balanced_threshold, detection_summary
from training.hard_negatives import DEFAULT_FILE as HARD_NEGATIVES_FILE, read_hard_negatives
from models.gtsdb import FRAME_SIZE, load_frames, read_ground_truth, split_frames
from training.loop import Loop, RunFiles, distributed, init_weights, make_scheduler, parameter_groups, run_epochs
from training.utils import Logger, Preemption, describe_machine, setup_distributed, teardown_distributed

FRAME_SIDE = FRAME_SIZE[0]  # served photos are shrunk to the longer side of GTSDB's frames
METRIC_FIELDS = ("epoch", "train_loss", "val_precision", "val_recall", "val_map50", "score_threshold", "seconds")
REPORT_SCORE = 0.3  # the score at which the per-epoch precision and recall are read off


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="detector", choices=["detector"])
    p.add_argument("--data-root", default=default_data_root(), help="folder holding gtsdb/ and gtsrb/ (env GTSRB_ROOT)")
    p.add_argument("--output", help="checkpoint path (default: detector.pt in $SIGNSERVE_CHECKPOINT_DIR, else "
                                    "in models/checkpoints)")
    p.add_argument("--epochs", type=int, default=32)
    p.add_argument("--crops-per-epoch", type=int, default=2048, help="training windows per epoch, all ranks")
    p.add_argument("--batch-size", type=int, default=16, help="global batch size, split over DDP ranks")
    p.add_argument("--crop", type=int, default=256, help="side of a training window in pixels")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up, then cosine decay to zero")
    p.add_argument("--paste-signs", type=int, default=4000, help="GTSRB crops to paste into windows (0: none)")
    p.add_argument("--paste-probability", type=float, default=0.5, help="share of windows that get pasted signs")
    p.add_argument("--scale-range", type=float, nargs=2, default=SCALE_RANGE, metavar=("MIN", "MAX"),
                   help="window rescale factors, drawn log-uniform")
    p.add_argument("--paste-widths", type=float, nargs=2, default=PASTE_WIDTHS, metavar=("MIN", "MAX"),
                   help="widths in pixels of the pasted GTSRB signs, drawn log-uniform")
    p.add_argument("--hard-negatives", default=str(HARD_NEGATIVES_FILE),
                   help="boxes mined by training.hard_negatives ('' for none)")
    p.add_argument("--hard-negative-probability", type=float, default=0.25,
                   help="share of windows centred on a hard negative")
    p.add_argument("--max-train-frames", type=int, default=None, help="first N training frames, for smoke runs")
    p.add_argument("--max-val-frames", type=int, default=None, help="first N validation frames, for smoke runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--resume", action="store_true", help="continue from <name>.state.pt if it exists")
    p.add_argument("--stop-after-epochs", type=int, default=None,
                   help="stop (as if preempted) after this many epochs of this invocation; for tests")
    return p


def focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss, summed (the caller divides by the number of signs):
    cells near a centre are punished less for firing, by (1 - target)^4."""
    p = logits.sigmoid().clamp(1e-4, 1 - 1e-4)
    pos = target.eq(1).float()
    pos_loss = -(F.logsigmoid(logits) * (1 - p) ** 2 * pos)
    neg_loss = -(F.logsigmoid(-logits) * p ** 2 * (1 - target) ** 4 * (1 - pos))
    return (pos_loss + neg_loss).sum()


def detection_loss(outputs: tuple[torch.Tensor, ...], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    heat, size, offset = (o.float() for o in outputs)
    mask = targets["mask"].unsqueeze(1)
    n = mask.sum().clamp(min=1)
    heat_loss = focal_loss(heat, targets["heat"]) / n
    size_loss = (F.l1_loss(size, targets["size"], reduction="none") * mask).sum() / n
    offset_loss = (F.l1_loss(offset, targets["offset"], reduction="none") * mask).sum() / n
    return heat_loss + size_loss + offset_loss


def train_one_epoch(model, optimizer, scheduler, sampler: CropSampler, pre: Preprocessing, args, device,
                    preemption: Preemption) -> float | None:
    """`--crops-per-epoch` windows in batches; the mean loss, or None when preempted mid-epoch."""
    model.train()
    per_rank = max(1, args.batch_size // args.world_size)
    steps = math.ceil(args.crops_per_epoch / args.batch_size)
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for _ in range(steps):
        if preemption.agreed(args.world_size, device):
            return None
        images, targets = sampler.batch(per_rank)
        x = normalize(images.to(device), pre).contiguous(memory_format=torch.channels_last)
        targets = {k: v.to(device) for k, v in targets.items()}
        loss = detection_loss(model(x), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += torch.tensor([loss.item(), 1.0], dtype=torch.float64, device=device)
    if args.world_size > 1:
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


def predict_frames(model: nn.Module, pixels: list[torch.Tensor], pre: Preprocessing, device,
                   min_score: float = 0.05) -> list[list[tuple[tuple[float, ...], float, int]]]:
    """Each full frame through the detector: (box, score, group) by falling score."""
    model.eval()
    out = []
    for frame in pixels:
        (found,) = detect(model, frame.unsqueeze(0).to(device), pre, min_score=min_score)
        out.append([(d.box, d.score, d.group) for d in found])
    return out


def best_threshold(frames, candidates=tuple(x / 20 for x in range(2, 19))) -> float:
    """The balanced score threshold on these frames (detection_metrics.balanced_threshold)."""
    summaries = {t: detection_summary(frames, t) for t in candidates}
    return balanced_threshold({t: (s["precision"], s["recall"]) for t, s in summaries.items()})


def validate(model, val_frames, val_pixels, pre, device) -> dict[str, float]:
    predictions = predict_frames(unwrap(model), val_pixels, pre, device)
    frames = [([(box, score) for box, score, _ in p], [s.box for s in f.signs])
              for p, f in zip(predictions, val_frames)]
    threshold = best_threshold(frames)
    at_report = detection_summary(frames, REPORT_SCORE)
    return {"val_precision": at_report["precision"], "val_recall": at_report["recall"],
            "val_map50": at_report["map50"], "score_threshold": threshold}


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.epochs < 1:
        raise SystemExit(f"--epochs must be at least 1, got {args.epochs}")
    if args.output is None:
        args.output = str(checkpoint_dir() / "detector.pt")
    rank, world, device = setup_distributed(args.device)
    args.world_size = world
    files = RunFiles.beside(args.output)
    if rank == 0:
        files.prepare(fresh=not args.resume)
    log = Logger(files.log, enabled=rank == 0)
    preemption = Preemption()
    torch.manual_seed(args.seed + rank)

    pre = Preprocessing(input_size=FRAME_SIDE, resize="fit")
    frames = read_ground_truth(args.data_root)
    train_frames = split_frames(frames, "train")[:args.max_train_frames]
    val_frames = split_frames(frames, "val")[:args.max_val_frames]
    train_pixels = load_frames(args.data_root, train_frames)
    val_pixels = load_frames(args.data_root, val_frames) if rank == 0 else []
    paste = load_paste_signs(args.data_root, args.paste_signs, seed=args.seed) if args.paste_signs else []
    hard = read_hard_negatives(args.hard_negatives) if args.hard_negatives else []
    sampler = CropSampler(train_frames, train_pixels, paste, crop=args.crop, paste_probability=args.paste_probability,
                          seed=args.seed * 1000 + rank, scale=tuple(args.scale_range),
                          paste_widths=tuple(args.paste_widths), hard_negatives=hard,
                          hard_probability=args.hard_negative_probability)

    model = SignDetector(num_groups=len(GROUPS))
    init_weights(model, "kaiming")
    model.reset_heads()  # init_weights is for hidden layers; the heads start small, at the prior
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(parameter_groups(model, args.weight_decay), lr=args.lr)
    steps_per_epoch = math.ceil(args.crops_per_epoch / args.batch_size)
    scheduler = make_scheduler(optimizer, int(args.warmup_epochs * steps_per_epoch), args.epochs * steps_per_epoch)
    signs = sum(len(f.signs) for f in train_frames)
    data_info = {"root": str(args.data_root), "dataset": "GTSDB", "train_frames": len(train_frames),
                 "train_signs": signs, "val_frames": len(val_frames),
                 "val_signs": sum(len(f.signs) for f in val_frames), "paste_signs": len(paste),
                 "hard_negatives": len(sampler.hard),
                 "input_size": pre.input_size}
    train_args = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool)) or v is None}
    train_args["machine"] = describe_machine(device, world)

    def checkpoint(metrics: list[dict]) -> dict:
        return make_checkpoint(model, architecture="detector", class_names=list(GROUPS), preprocessing=pre,
                               start_weights="random", metrics=metrics, train_args=train_args, data=data_info,
                               inference={"score_threshold": metrics[-1]["score_threshold"]})

    loop = Loop("detector", files, log, rank, world, device, model, optimizer, scheduler, args.epochs, checkpoint,
                csv_fields=METRIC_FIELDS, stop_after_epochs=args.stop_after_epochs,
                extra_state={"sampler": (sampler.state_dict, sampler.load_state_dict)})
    if args.resume:
        loop.restore()
    trained = distributed(model, world, device)
    log(f"model detector ({count_parameters(model):,} parameters, start random) on {device}"
        f"{' x' + str(world) if world > 1 else ''}; train {len(train_frames)} frames / {signs} signs + "
        f"{len(paste)} GTSRB signs to paste + {len(sampler.hard)} hard negatives, val {len(val_frames)} frames; {args.crops_per_epoch} windows of "
        f"{args.crop}px per epoch, AdamW lr {args.lr} batch {args.batch_size}")

    def train_epoch(epoch: int) -> dict | None:
        loss = train_one_epoch(trained, optimizer, scheduler, sampler, pre, args, device, preemption)
        if loss is None:
            return None
        # the validation frames live on rank 0, which alone writes the run files
        return {"train_loss": loss, **(validate(trained, val_frames, val_pixels, pre, device) if rank == 0 else {})}

    status = run_epochs(loop, train_epoch, preemption)
    metrics = loop.metrics
    if status == 0 and metrics:
        log(f"done: {len(metrics)} epochs, {sum(m['seconds'] for m in metrics):.0f} s in all, val AP@0.5 "
            f"{metrics[-1]['val_map50']:.4f}; checkpoint {files.checkpoint}")
    teardown_distributed(world)
    return status


if __name__ == "__main__":
    sys.exit(main())
