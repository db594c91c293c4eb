"""Watching a run where researchers already look: trackio, TensorBoard and Weights & Biases.

    python distill.py --report-to trackio,tensorboard        # several at once; default: none
    trackio show --project tip                               # then the dashboards (README)
    tensorboard --logdir runs

metrics.jsonl stays the record of truth; a tracker gets a copy of it. Every key of a step's record
goes to the tracker at that step under the same name (the README's metrics table), the resolved
settings go in as the run's config, and on a step with an evaluation the quadrant picture of that
step's tokens (ĥ against δ̂, coloured by quadrant, the kept ones ringed) and the quadrant table go
in too, as `eval/quadrants` (an image) and `eval/quadrant_table` (a table; text in TensorBoard).
A tracker's run is named after the output folder, which holds metrics.jsonl, the TensorBoard
event files and wandb's local run folders, and its config names that folder.

The rules, and where each is kept:
- a tracker is imported only when chosen; one that is not installed is refused in one line, exit
  status 2, naming the `pip install` to do, before anything runs (`check`, from distill.validate);
  one that cannot start is refused the same way before the first step, leaving nothing in the
  output folder (`start`);
- once the run has started no tracker can stop it: a log call that fails (or a picture that cannot
  be drawn) is reported once per tracker on stderr and the run goes on (`Trackers.log`);
- under torchrun only rank 0 reports (its own share of the tokens in the picture);
- `--resume` continues the same tracker run: the ids are kept in `<output dir>/trackers.json`;
  trackio resumes the run of that name, wandb the run of that id (offline: a second local folder
  with the same id, which `wandb sync` joins), TensorBoard appends to the same folder and hides
  the events after the checkpoint's step that the killed run had written (`purge_step`).

The quadrant picture is drawn here, once, for the trackers and for analysis.py's quadrants.png.
"""
import argparse
import importlib
import json
import os
import shutil
import sys

import torch

from loading import UsageError
from parallel import all_reduce_sum, world_size
from tip import QUADRANTS, percentile, quadrant_summary

# what `import` each tracker needs, and the pinned release to install (as in requirements.txt)
MODULES = {"trackio": "trackio", "tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}
PACKAGES = {"trackio": "trackio==0.43.0", "tensorboard": "tensorboard==2.21.0",
            "wandb": "wandb==0.31.0"}
PROJECT = "tip"  # the trackio / wandb project (wandb: WANDB_PROJECT overrides it)
IDS_FILE = "trackers.json"
PICTURE_KEYS = ("h_hat", "d_hat", "quadrant", "reverse_kl")
COLORS = {1: "#d62728", 2: "#ff9f1c", 3: "#7b2cbf", 4: "#2a9d8f"}  # Q1 red .. Q4 teal


def parse_names(text):
    """'trackio,tensorboard' -> ["trackio", "tensorboard"]; 'none' -> [] (argparse `type`)."""
    names = [n.strip() for n in text.split(",") if n.strip() and n.strip() != "none"]
    unknown = [n for n in names if n not in MODULES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown tracker {unknown[0]!r}; choose none or a comma "
                                         f"list of {', '.join(MODULES)}")
    return list(dict.fromkeys(names))


def add_flag(p, runs=True):
    """--report-to, as distill.py and sweep.py take it; with `runs`, --run-name and --run-group."""
    p.add_argument("--report-to", type=parse_names, default="none", metavar="NAMES",
                   help=f"none, or a comma list of {', '.join(MODULES)}: every step's record, the "
                   "settings, and at evaluations the quadrant picture and table (README)")
    if runs:  # distill.py: how the tracker names and groups this run (sweep.py sets both)
        p.add_argument("--run-name", help="the tracker run's name (default: the output folder's)")
        p.add_argument("--run-group", help="the tracker group of the run (default: none)")


def check(names):
    """Import each chosen tracker now, so that a missing one is one line before anything runs."""
    for name in names:
        try:
            importlib.import_module(MODULES[name])
        except Exception as e:  # ImportError, or an install broken in some other way
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UsageError(f"--report-to {name}: cannot import {name} ({reason}); install it: "
                             f"pip install {PACKAGES[name]}") from None


# ---------------------------------------------------------------------------------------------
# The quadrant picture and table of one step's tokens
# ---------------------------------------------------------------------------------------------

def picture_tokens(stats, kept, mask):
    """What the picture needs of one micro-batch: (N,) CPU tensors at the mask's N positions."""
    return {**{k: stats[k][mask].detach().cpu() for k in PICTURE_KEYS}, "kept": kept[mask].cpu()}


def quadrant_figure(h_hat, d_hat, quadrant, kept=None, thresholds=None, title=None, linthresh=None):
    """Scatter of ĥ against δ̂ coloured by quadrant (the `kept` ones ringed, the thresholds dashed),
    log-count marginal histograms. (N,) tensors -> (matplotlib Figure, {quadrant: points drawn}).
    Uses no pyplot, so it neither needs a display nor touches the caller's figures."""
    import numpy as np
    from matplotlib.figure import Figure
    h, d, q = (torch.as_tensor(x).float().numpy() for x in (h_hat, d_hat, quadrant))  # (N,) each
    fig = Figure(figsize=(8, 8), dpi=100)
    grid = fig.add_gridspec(2, 2, width_ratios=(4, 1), height_ratios=(1, 4), hspace=0.05, wspace=0.05)
    ax = fig.add_subplot(grid[1, 0])
    top, right = fig.add_subplot(grid[0, 0], sharex=ax), fig.add_subplot(grid[1, 1], sharey=ax)
    drawn = {}
    for k in (1, 4, 2, 3):  # the small quadrants last, on top
        drawn[k] = ax.scatter(h[q == k], d[q == k], s=6, alpha=0.5, color=COLORS[k],
                              label=f"{QUADRANTS[k]} ({(q == k).mean() if len(q) else 0:.0%})")
    if kept is not None:
        k = torch.as_tensor(kept).numpy()  # (N,) bool
        ax.scatter(h[k], d[k], s=22, facecolors="none", edgecolors="k", linewidths=0.5,
                   label=f"kept ({k.mean() if len(k) else 0:.0%})")
    if thresholds is not None:
        ax.axvline(thresholds[0], color="k", lw=0.8, ls="--")
        ax.axhline(thresholds[1], color="k", lw=0.8, ls="--")
    ax.set_xlabel("ĥ: normalised student entropy")
    ax.set_ylabel("δ̂: normalised reverse KL(P_S ‖ P_T)")
    bins = [50, 50]
    if linthresh:  # most tokens sit near 0 on both axes: linear below linthresh, log above
        for i, axis in enumerate((ax.set_xscale, ax.set_yscale)):
            axis("symlog", linthresh=linthresh[i], linscale=0.5)
            bins[i] = np.concatenate([[0], np.geomspace(linthresh[i] / 10, 1, 49)])
    top.hist(h, bins=bins[0], color="0.4", log=True)
    right.hist(d, bins=bins[1], color="0.4", log=True, orientation="horizontal")
    top.tick_params(labelbottom=False)
    right.tick_params(labelleft=False)
    top.set_title(title or f"{len(h)} response tokens" + (
        "" if thresholds is None else f"; dashed: thresholds {thresholds[0]:.3f}, {thresholds[1]:.3f}"))
    handles, labels = ax.get_legend_handles_labels()
    order = [labels.index(x) for x in sorted(labels, key=lambda x: (x[0] != "Q", x))]  # Q1..Q4, kept
    corner = fig.add_subplot(grid[0, 1])  # the legend goes in the empty corner, over no point
    corner.axis("off")
    corner.legend([handles[i] for i in order], [labels[i] for i in order], loc="center", fontsize=7,
                  markerscale=2, borderaxespad=0)
    return fig, {k: len(drawn[k].get_offsets()) for k in QUADRANTS}


def quadrant_rows(tokens):
    """The quadrant table of one step: per quadrant, its tokens, their share, the kept ones, the
    quadrant's share of the kept tokens and of the reverse-KL mass (tip.quadrant_summary)."""
    q, kept = tokens["quadrant"], tokens["kept"]  # (N,) each
    every = torch.ones_like(kept)  # (N,) the tokens are already the response positions
    summary = quadrant_summary(q, tokens["reverse_kl"], every)
    n_kept = max(int(kept.sum()), 1)
    return [[QUADRANTS[k], int((q == k).sum()), summary[k]["share"], int((kept & (q == k)).sum()),
             int((kept & (q == k)).sum()) / n_kept, summary[k]["kl_share"]] for k in QUADRANTS]


TABLE_COLUMNS = ["quadrant", "tokens", "share", "kept", "kept_share", "kl_share"]


def picture(tokens, step):
    """The step's image (H, W, 3) uint8 array and table rows, from the micro-batches' tokens."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    # One micro-batch in one process: its quadrant thresholds are the medians of these very tokens
    # (tip.classify_quadrants); otherwise each micro-batch had its own, and no line is drawn.
    one = len(tokens) == 1 and world_size() == 1
    tokens = {k: torch.cat([t[k] for t in tokens]) for k in tokens[0]}  # (N,) each
    thresholds = tuple(percentile(tokens[k], 50).item() for k in ("h_hat", "d_hat")) if one else None
    fig, _ = quadrant_figure(tokens["h_hat"], tokens["d_hat"], tokens["quadrant"], tokens["kept"],
                             thresholds, f"step {step}: {len(tokens['kept'])} response tokens, "
                             f"{int(tokens['kept'].sum())} kept (ringed)", linthresh=(1e-3, 1e-5))
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    image = np.asarray(canvas.buffer_rgba())[..., :3].copy()  # (H, W, 3) uint8
    return image, quadrant_rows(tokens)


# ---------------------------------------------------------------------------------------------
# The trackers: one small adapter each, all with log(scalars, step, picture) and close()
# ---------------------------------------------------------------------------------------------

class WandbLike:
    """log and close of a tracker with wandb's API (trackio copies it): `self.lib`, `self.run`."""

    def log(self, scalars, step, picture):
        if picture:
            image, rows = picture
            scalars = {**scalars, "eval/quadrants": self.lib.Image(image),
                       "eval/quadrant_table": self.lib.Table(columns=TABLE_COLUMNS, data=rows)}
        self.run.log(scalars, step=step)

    def close(self):
        self.run.finish()


class Trackio(WandbLike):
    def __init__(self, run):
        import trackio
        self.lib = trackio
        # trackio resumes a run by its name: a fresh run never takes over an older one's name
        self.run = trackio.init(project=PROJECT, name=run["name"], group=run["group"],
                                config=run["config"], resume="allow" if run["resuming"] else "never",
                                auto_log_cpu=False, auto_log_gpu=False, embed=False)
        run["ids"]["trackio"] = self.run.id


class Wandb(WandbLike):
    def __init__(self, run):
        import wandb
        self.lib = wandb
        run_id = run["ids"].get("wandb")  # None: wandb draws a new one, kept for --resume
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=run["name"],
                              group=run["group"], id=run_id, resume="allow" if run_id else None,
                              config=run["config"], dir=os.environ.get("WANDB_DIR") or run["output_dir"])
        run["ids"]["wandb"] = self.run.id


class TensorBoard:
    def __init__(self, run):
        from torch.utils.tensorboard import SummaryWriter
        # on --resume: events of steps after the checkpoint (a killed run wrote them) are hidden
        self.writer = SummaryWriter(run["output_dir"],
                                    purge_step=run["start"] + 1 if run["resuming"] else None)
        if not run["resuming"]:
            self.writer.add_text("settings", markdown(["setting", "value"],
                                                      [[k, v] for k, v in run["config"].items()]), 0)

    def log(self, scalars, step, picture):
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        if picture:
            image, rows = picture
            self.writer.add_image("eval/quadrants", image, step, dataformats="HWC")
            self.writer.add_text("eval/quadrant_table", markdown(TABLE_COLUMNS, rows), step)
        self.writer.flush()  # the dashboard sees every step as it ends

    def close(self):
        self.writer.close()


ADAPTERS = {"trackio": Trackio, "tensorboard": TensorBoard, "wandb": Wandb}
ORDER = ("trackio", "wandb", "tensorboard")  # the one that writes into the output folder last


def markdown(columns, rows):
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    return "\n".join(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
                     + ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows])


class Trackers:
    """The chosen trackers of one run (none on ranks other than 0, or with --report-to none)."""

    def __init__(self, adapters=()):
        self.adapters, self.reported = dict(adapters), set()

    def tokens(self):
        """A list for opd_step to fill with the step's tokens when a tracker will draw them."""
        return [] if self.adapters else None

    def log(self, record, tokens=None):
        """Send one metrics.jsonl record (and, on an evaluation step, its picture); never raises."""
        if not self.adapters:
            return
        step = record["step"]
        scalars = {k: v for k, v in record.items() if k != "step"}
        drawn = None
        if tokens and any(k.startswith("eval/") for k in record):
            try:
                drawn = picture(tokens, step)
            except Exception as e:
                self.report("the quadrant picture of --report-to", f"at step {step}", e)
        for name, adapter in self.adapters.items():
            try:
                adapter.log(scalars, step, drawn)
            except Exception as e:
                self.report(f"--report-to {name}", f"at step {step}", e)

    def report(self, what, where, error):
        if what not in self.reported:  # once: a tracker that is down would fill the log
            self.reported.add(what)
            print(f"warning: {what} failed {where} ({type(error).__name__}: {error}); the run goes "
                  "on, metrics.jsonl has every step, and further failures of it are not reported",
                  file=sys.stderr, flush=True)

    def close(self):
        for name, adapter in list(self.adapters.items()):
            try:
                adapter.close()
            except Exception as e:
                self.report(f"--report-to {name}", "when closing", e)
        self.adapters = {}


def start(names, output_dir, rank, step, name=None, group=None, config=None):
    """Open the trackers `names` (--report-to) on rank 0 for the run in `output_dir` that starts
    after `step` (0 unless resumed), named `name` (default: the folder's name) in `group`, with its
    settings `config` (a dict); or refuse in one line (UsageError), leaving nothing in the output
    folder. Every rank calls it: a refusal on rank 0 stops every rank."""
    names, error, trackers = names if rank == 0 else [], None, Trackers()
    if names:
        try:
            trackers = open_trackers(names, output_dir, step, name, group, config or {})
        except UsageError as e:
            error = e
    if all_reduce_sum(float(error is not None)):  # so that no rank waits for a rank 0 that left
        raise error or UsageError("--report-to: rank 0 could not start a tracker (see its error)")
    return trackers


def open_trackers(names, output_dir, step, name, group, config):
    """The adapters of `names`, opened in ORDER, and trackers.json written; on a failure the ones
    already open are closed and an output folder made here is removed."""
    out = os.path.abspath(output_dir)
    ids_path = os.path.join(out, IDS_FILE)
    resuming = step > 0
    ids = json.load(open(ids_path)) if resuming and os.path.isfile(ids_path) else {}
    run = {"name": ids.get("name") or name or os.path.basename(out),
           "group": group, "output_dir": out, "start": step,
           "resuming": resuming, "ids": ids,
           "config": {**dict(sorted(config.items())), "output_dir": out}}
    ids["name"] = run["name"]
    created = not os.path.isdir(out)
    opened = {}
    try:
        os.makedirs(out, exist_ok=True)  # wandb's run folder and the event files go in it
        for name in sorted(names, key=ORDER.index):
            try:
                opened[name] = ADAPTERS[name](run)
            except Exception as e:
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise UsageError(f"--report-to {name}: cannot start ({type(e).__name__}: "
                                 f"{reason})") from None
        with open(ids_path + ".tmp", "w") as f:
            json.dump(ids, f)
        os.replace(ids_path + ".tmp", ids_path)
    except BaseException:
        Trackers(opened).close()
        if created:  # a refused start leaves nothing behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    return Trackers(opened)
