"""What every benchmark script shares, in one place: each concern lives in exactly one module here.

=================  ==========================================================================================
``paths``          where things are (repository, results, the demo recipe) and the offline environment
``provenance``     :class:`Run` (command line, clock, log) and result writing with provenance: git commit
                   and dirty-code hash, command, config, backbone fingerprints, versions, machine, times
``corpus``         ``--config``/``--set``, the corpus (given or generated from the recipe), the work
                   directory (named after the code version, refused under other code)
``federation``     :class:`FedBench`: speaker split, central base model (trained once), partitions
                   (``FedBench.partition``: devices, labels, personal test speech per seed), cached runs
``stats``          mean ± std over seeds, paired differences per seed with 95 % Student-t intervals
``timing``         interleaved repetitions, medians/quartiles, ratios, a scratch work directory
``plots``          one headless matplotlib figure per PNG
``baseline``       MFCC statistics + logistic regression (the classic reference)
=================  ==========================================================================================

The scripts run as ``python benchmarks/X.py`` (and are loaded by path in the tests), so each one puts
its folder on ``sys.path`` and imports this package as ``common``; importing it makes the checkout's
``fedsd`` importable without an install. Heavy libraries (torch, Flower) are imported where used.
"""

from __future__ import annotations

from .baseline import fit_score, mfcc_features, mfcc_stats
from .corpus import (
    add_config_args,
    add_corpus_args,
    base_overrides,
    corpus_info,
    corpus_overrides,
    ensure_corpus,
    load_recipe,
    prepare_corpus,
    work_dir,
)
from .federation import NAN, FedBench, add_federation_args, personal_line, personal_results, took
from .paths import (
    BENCH,
    CODE_PATHS,
    DEMO,
    EMOTIONS,
    ENV,
    FEDERATED_WORK,
    RECIPE,
    RESULTS,
    ROOT,
    WORK_STAMP,
    quiet,
)
from .plots import figure
from .provenance import (
    Run,
    checkpoint_fingerprint,
    checkpoint_id,
    code_tag,
    code_version,
    digest,
    jsonable,
    library_versions,
    machine,
    run_main,
    set_threads,
)
from .stats import cell, ci_cell, holm, mean_std, paired, paired_p, t_interval
from .timing import (
    CLOCKS,
    add_timing_args,
    args_config,
    check_sizes,
    default_exits,
    device_parser,
    int_list,
    interleaved,
    over,
    quartiles_ms,
    scratch,
    spread_s,
    timed_main,
)

__all__ = [
    "BENCH", "CLOCKS", "CODE_PATHS", "DEMO", "EMOTIONS", "ENV", "FEDERATED_WORK", "RECIPE", "RESULTS", "ROOT", "WORK_STAMP",
    "FedBench", "NAN", "Run", "add_config_args", "add_corpus_args", "add_federation_args", "add_timing_args", "args_config", "base_overrides",
    "cell", "check_sizes", "holm", "paired_p", "checkpoint_fingerprint", "checkpoint_id", "ci_cell", "code_tag", "code_version",
    "corpus_info", "corpus_overrides", "default_exits", "device_parser", "digest", "ensure_corpus", "figure", "fit_score",
    "int_list", "interleaved", "jsonable", "library_versions", "load_recipe", "machine", "mean_std", "mfcc_features",
    "mfcc_stats", "over", "paired", "personal_line", "personal_results", "prepare_corpus", "quartiles_ms", "quiet", "run_main", "scratch",
    "set_threads", "spread_s", "t_interval", "timed_main", "took", "work_dir",
]  # fmt: skip
