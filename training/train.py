"""Train a GTSRB classifier; every epoch logs train and test cross-entropy and accuracy.

    python -m training.train --model cnn
    python -m training.train --model resnet18 --start-weights imagenet        # needs internet once
    python -m training.train --model resnet18 --weights resnet18-f37072fd.pth # local ImageNet weights
    torchrun --nproc-per-node 4 -m training.train --model resnet18 ...        # DDP, one process per GPU

Outputs, next to --output (default $SIGNSERVE_CHECKPOINT_DIR/<model>.pt, else models/checkpoints/<model>.pt):
  <name>.pt           servable checkpoint (models/checkpoint.py), rewritten atomically after each epoch
  <name>.metrics.csv  epoch,train_loss,train_accuracy,test_loss,test_accuracy,seconds
                      (+ online_test_accuracy with --model-ema: the test figures are then the average's)
  <name>.log          every line this script printed, appended across resumed runs
  <name>.state.pt     optimizer/scheduler/RNG state for --resume

On SIGUSR1 or SIGTERM (Slurm's warning before the time limit, preemption) the run stops at the next
batch, keeps the state of the last completed epoch and exits with EXIT_PREEMPTED (99); the same
command with --resume continues at the next epoch, so no epoch is lost or logged twice.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DistributedSampler

from models.architectures import (ARCHITECTURES, KIND_OF_ARCHITECTURE, PretrainedWeightsUnavailable, build_model,
                                  count_parameters)
from models.backends import cpu_flags, native_bf16
from models.checkpoint import make_checkpoint, unwrap
from models.classes import CLASS_NAMES
from models.input_sizes import DEFAULT_INPUT_SIZE
from models.paths import checkpoint_dir, default_data_root
from models.preprocessing import Preprocessing, normalize
from training.augment import augment
from models.gtsrb import load_split
from training.evaluate import evaluate
from training.metrics import LossAccuracy
from training.sam import SAM
from training.loop import Loop, RunFiles, distributed, init_weights, make_scheduler, parameter_groups, run_epochs
from training.utils import (Logger, Preemption, broadcast_buffers, describe_machine, model_ema, progress_bar,
                            setup_distributed, teardown_distributed)

DEFAULT_EPOCHS = 20
MAX_EPOCHS = 60  # a bound against typos


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=ARCHITECTURES,
                   help="the detector takes training.train_detector's options")
    p.add_argument("--data-root", default=default_data_root(), help="folder holding gtsrb/ (env GTSRB_ROOT)")
    p.add_argument("--output", help="checkpoint path (default: <model>.pt in $SIGNSERVE_CHECKPOINT_DIR, else "
                                    "in models/checkpoints)")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help=f"1..{MAX_EPOCHS}")
    p.add_argument("--batch-size", type=int, default=128, help="global batch size, split over DDP ranks")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default per optimizer)")
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw", "sam"])
    p.add_argument("--sam-base", default="sgd", choices=["sgd", "adamw"], help="optimizer that SAM wraps")
    p.add_argument("--rho", type=float, default=0.05, help="SAM neighbourhood radius")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up, then cosine decay to zero")
    p.add_argument("--init", default="kaiming", choices=["kaiming", "zeros"],
                   help="weight init of layers trained from scratch; 'zeros' demonstrates why it fails")
    p.add_argument("--start-weights", default=None, choices=["random", "imagenet"],
                   help="resnet18 start (default: imagenet when --weights is given, else random)")
    p.add_argument("--weights", help="local ImageNet ResNet18 weights file (implies --start-weights imagenet)")
    sizes = ", ".join(f"{name} {side}" for name, side in DEFAULT_INPUT_SIZE.items())
    p.add_argument("--input-size", type=int, default=None, help=f"square input side (default {sizes})")
    p.add_argument("--no-augment", action="store_true", help="train on the plain images")
    p.add_argument("--random-erasing", type=float, default=0.0, metavar="P",
                   help="per image, the probability of covering a random rectangle with noise (occlusion)")
    p.add_argument("--model-ema", action="store_true",
                   help="evaluate, checkpoint and serve an exponential moving average of the weights and "
                        "BatchNorm statistics instead of the last step's")
    p.add_argument("--model-ema-decay", type=float, default=0.999,
                   help="per optimizer step; 0.999 weighs the last ~1,000 steps (~3 GTSRB epochs at batch 128)")
    p.add_argument("--equalize", action="store_true", help="histogram-equalise each image's luminance")
    p.add_argument("--train-metrics", default="full", choices=["full", "running"],
                   help="full: an eval-mode pass over the train split each epoch; running: the training "
                        "batches' average (cheaper, but with augmentation and dropout on)")
    p.add_argument("--max-train-samples", type=int, default=None, help="random subset for smoke runs")
    p.add_argument("--max-test-samples", type=int, default=None, help="random subset for smoke runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="bf16 autocast for the forward passes; auto: on CUDA and on CPUs with native bf16")
    p.add_argument("--half-checkpoint", action="store_true", help="store weights in fp16 (half the file)")
    p.add_argument("--resume", action="store_true", help="continue from <name>.state.pt if it exists")
    p.add_argument("--no-calibrate", action="store_true",
                   help="skip fitting the temperature and sign gate after the last epoch (training.calibrate); "
                        "runs on a subset (--max-*-samples) skip it anyway")
    p.add_argument("--stop-after-epochs", type=int, default=None,
                   help="stop (as if preempted) after this many epochs of this invocation; for tests")
    return p


# ---------------------------------------------------------------- model and optimiser


def make_optimizer(args, model: nn.Module) -> torch.optim.Optimizer:
    groups = parameter_groups(model, args.weight_decay)
    kind = args.sam_base if args.optimizer == "sam" else args.optimizer
    cls, kwargs = ((torch.optim.SGD, dict(lr=args.lr, momentum=args.momentum, nesterov=True)) if kind == "sgd"
                   else (torch.optim.AdamW, dict(lr=args.lr)))
    if args.optimizer == "sam":
        return SAM(groups, cls, rho=args.rho, **kwargs)
    return cls(groups, **kwargs)


# ---------------------------------------------------------------- one epoch


def train_one_epoch(model, optimizer, scheduler, images, labels, order, pre, args, device, autocast,
                    preemption: Preemption, progress, ema: AveragedModel | None = None) -> dict | None:
    """One pass over `order` (this rank's sample indices); `ema` follows every step. None when preempted
    mid-epoch."""
    model.train()
    per_rank_batch = max(1, args.batch_size // args.world_size)
    totals = LossAccuracy(device)
    for start in range(0, len(order), per_rank_batch):
        if preemption.agreed(args.world_size, device):
            return None
        idx = order[start:start + per_rank_batch]
        x = normalize(images[idx].to(device, non_blocking=True), pre)
        y = labels[idx].to(device, non_blocking=True)
        if not args.no_augment:
            x = augment(x, args.random_erasing)
        x = x.contiguous(memory_format=torch.channels_last)

        def loss_fn() -> tuple[torch.Tensor, torch.Tensor]:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = model(x)
            return F.cross_entropy(logits.float(), y, label_smoothing=args.label_smoothing), logits

        optimizer.zero_grad(set_to_none=True)
        loss, logits = loss_fn()
        loss.backward()
        if isinstance(optimizer, SAM):
            optimizer.first_step()
            optimizer.zero_grad(set_to_none=True)
            loss_fn()[0].backward()
            optimizer.second_step()
        else:
            optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(unwrap(model))
        totals.update(logits, y)
        if progress is not None:
            progress.update(1)
    return totals.result(args.world_size)


def resolve_args(args) -> None:
    if not 1 <= args.epochs <= MAX_EPOCHS:
        raise SystemExit(f"--epochs must be between 1 and {MAX_EPOCHS}, got {args.epochs}")
    if not 0 < args.model_ema_decay < 1:
        raise SystemExit(f"--model-ema-decay must lie strictly between 0 and 1, got {args.model_ema_decay}")
    if not 0 <= args.random_erasing <= 1:
        raise SystemExit(f"--random-erasing is a probability in [0, 1], got {args.random_erasing}")
    if args.weights and args.start_weights == "random":
        raise SystemExit("--weights loads ImageNet weights; it contradicts --start-weights random")
    if args.start_weights is None:
        args.start_weights = "imagenet" if args.weights else "random"
    if args.model == "cnn" and args.start_weights == "imagenet":
        raise SystemExit("the cnn has no ImageNet weights; only resnet18 takes --start-weights imagenet")
    if args.lr is None:
        args.lr = 0.05 if (args.optimizer == "sgd" or (args.optimizer == "sam" and args.sam_base == "sgd")) else 2e-3
    args.input_size = args.input_size or DEFAULT_INPUT_SIZE[args.model]
    if args.output is None:
        args.output = str(checkpoint_dir() / f"{args.model}.pt")



# ---------------------------------------------------------------- main


def create_model(args, device: torch.device) -> tuple[nn.Module, str]:
    """The model on `device`, initialised, and the label of its start weights for the checkpoint."""
    model = build_model(args.model, start_weights=args.start_weights, weights_path=args.weights,
                        input_size=args.input_size)
    start_label = args.start_weights if not args.weights else f"imagenet:{Path(args.weights).name}"
    if args.start_weights == "random":
        init_weights(model, args.init)
    else:
        init_weights(model.fc, args.init)  # only the new head is trained from scratch
    # channels_last: faster convolutions with cuDNN, and with oneDNN on the CPU (10-20 % per step here)
    return model.to(device, memory_format=torch.channels_last), start_label


def use_bf16(precision: str, device: torch.device, flags: set[str] | None = None) -> bool:
    """bf16 autocast (weights and optimizer stay fp32, no loss scaling needed): ~2x the training images/s
    on CUDA and on CPUs with native bf16 (resnet18 at 80x80 on 2 AVX-512 bf16 cores: 258 against 102,
    bench.input_sizes)."""
    if precision != "auto":
        return precision == "bf16"
    flags = cpu_flags() if flags is None else flags
    return device.type == "cuda" or (device.type == "cpu" and native_bf16(flags))


def steps_per_epoch(samples: int, batch_size: int, world: int) -> int:
    """Optimizer steps per epoch on each rank: its share of the samples in batches of batch_size / world."""
    return math.ceil(math.ceil(samples / world) / max(1, batch_size // world))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    chosen = argparse.ArgumentParser(add_help=False)
    chosen.add_argument("--model", choices=ARCHITECTURES)
    if KIND_OF_ARCHITECTURE.get(chosen.parse_known_args(argv)[0].model) == "detector":
        from training.train_detector import main as train_detector  # its own data, loss and metrics
        return train_detector(argv)
    args = get_args_parser().parse_args(argv)
    resolve_args(args)
    rank, world, device = setup_distributed(args.device)
    args.world_size = world
    files = RunFiles.beside(args.output)
    if rank == 0:
        files.prepare(fresh=not args.resume)
    log = Logger(files.log, enabled=rank == 0)
    preemption = Preemption()
    torch.manual_seed(args.seed + rank)

    pre = Preprocessing(input_size=args.input_size, equalize=args.equalize)
    try:
        model, start_label = create_model(args, device)
    except (PretrainedWeightsUnavailable, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # Data lives on the training device for the whole run: an epoch is pure tensor indexing.
    # a subset run (--max-*-samples) decodes only its samples
    train = load_split(args.data_root, "train", pre, n=args.max_train_samples, seed=args.seed)
    test = load_split(args.data_root, "test", pre, n=args.max_test_samples, seed=args.seed)
    steps = steps_per_epoch(len(train), args.batch_size, world)
    optimizer = make_optimizer(args, model)
    scheduler = make_scheduler(optimizer, int(args.warmup_epochs * steps), args.epochs * steps)
    data_info = {"root": str(args.data_root), "train_samples": len(train), "test_samples": len(test),
                 "dataset": "GTSRB", "input_size": pre.input_size}
    train_args = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool)) or v is None}
    train_args["machine"] = describe_machine(device, world)

    ema = model_ema(model, args.model_ema_decay) if args.model_ema else None
    shipped = ema.module if ema is not None else model  # the weights checkpointed and served

    def checkpoint(metrics: list[dict]) -> dict:
        return make_checkpoint(shipped, architecture=args.model, class_names=list(CLASS_NAMES), preprocessing=pre,
                               start_weights=start_label, metrics=metrics, train_args=train_args, data=data_info,
                               half=args.half_checkpoint)

    loop = Loop(args.model, files, log, rank, world, device, model, optimizer, scheduler, args.epochs, checkpoint,
                stop_after_epochs=args.stop_after_epochs,
                extra_state={"model_ema": (ema.state_dict, ema.load_state_dict)} if ema is not None else {})
    if args.resume:
        loop.restore()
    trained = distributed(model, world, device)
    autocast = use_bf16(args.precision, device)
    eval_autocast = autocast and device.type == "cuda"  # on the CPU the logged figures are those served (fp32)
    log(f"model {args.model} ({count_parameters(model):,} parameters, start {start_label}, init "
        f"{args.init}) on {device}{' x' + str(world) if world > 1 else ''}; train {len(train)} / test {len(test)} "
        f"images at {pre.input_size}x{pre.input_size}; optimizer {args.optimizer} lr {args.lr} batch {args.batch_size}; "
        f"{'bf16 autocast' if autocast else 'fp32'}"
        f"{f'; weights averaged (EMA {args.model_ema_decay})' if ema is not None else ''}")

    train_images, train_labels = train.images.to(device), train.labels.to(device)
    sampler = DistributedSampler(range(len(train)), num_replicas=world, rank=rank, shuffle=True, seed=args.seed)

    def train_epoch(epoch: int) -> dict | None:
        # Same permutation on every rank, padded so that every rank runs the same number of steps.
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler), device=device)
        progress = progress_bar(steps, epoch, rank == 0 and sys.stdout.isatty())
        running = train_one_epoch(trained, optimizer, scheduler, train_images, train_labels, order, pre, args,
                                  device, autocast, preemption, progress, ema)
        if progress is not None:
            progress.close()
        if running is None:
            return None
        if ema is not None and epoch <= args.warmup_epochs:
            ema.n_averaged.fill_(0)  # the average starts over after the warm-up (as torchvision's references)
        # Evaluated through DDP, every rank uses rank 0's BatchNorm statistics, as the checkpoint does;
        # the average's statistics follow each rank's own, so rank 0's are copied to the others.
        evaluated = trained if ema is None else broadcast_buffers(ema.module, world)
        shard = (rank, world)
        train_m = (evaluate(evaluated, train, pre, device, autocast=eval_autocast, shard=shard)
                   if args.train_metrics == "full" else running)
        test_m = evaluate(evaluated, test, pre, device, autocast=eval_autocast, shard=shard)
        figures = {"train_loss": train_m["loss"], "train_accuracy": train_m["accuracy"],
                   "test_loss": test_m["loss"], "test_accuracy": test_m["accuracy"]}
        if ema is not None:  # the last step's weights, for comparison
            figures["online_test_accuracy"] = evaluate(trained, test, pre, device, autocast=eval_autocast,
                                                       shard=shard)["accuracy"]
        return figures

    status = run_epochs(loop, train_epoch, preemption)
    metrics = loop.metrics
    if status == 0:
        log(f"done: {len(metrics)} epochs, {sum(m['seconds'] for m in metrics):.0f} s in all, "
            f"test accuracy {metrics[-1]['test_accuracy']:.4f}; checkpoint {files.checkpoint}")
        if rank == 0:
            calibrate_after_training(args, files.checkpoint, log)
    teardown_distributed(world)
    return status


def calibrate_after_training(args, out: Path, log: Logger) -> None:
    """Temperature, sign gate and recognition rule into the final checkpoint (training.calibrate);
    its ECE and NLL before and after go to the log. Smoke runs on subsets are not worth it."""
    from training.calibrate import calibrate_checkpoints

    if args.no_calibrate or args.max_train_samples or args.max_test_samples:
        log("calibration skipped (--no-calibrate or a subset run); `python -m training.calibrate` does it later")
        return
    if not (Path(args.data_root) / "gtsdb" / "gt.txt").is_file():
        log(f"calibration skipped: no GTSDB frames under {args.data_root}/gtsdb to fit it on")
        return
    calibrate_checkpoints([Path(out)], args.data_root, log=log, device=args.device if args.device != "auto" else "cpu")


if __name__ == "__main__":
    sys.exit(main())
