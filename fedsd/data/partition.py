"""Split a manifest into a held-out test set, an optional server pool and federated clients.

Why speakers matter: speech emotion models latch onto voices, so a test set must hold *unseen speakers*
(chosen by seed, held out before anything else), and a "device" is naturally one speaker or a few.
Label scarcity is simulated per client with a stratified, *nested* labelled subset: every utterance has
a fixed pseudo-random rank (a hash of seed and utt_id), and a client labels the first ceil(f * n_c)
utterances of each class c by that rank, so the 10 % labelled set is contained in the 20 % one and
results across label fractions differ only in the labels, not in the draw.

Only labelled manifest rows take part (a partition needs ground truth to evaluate and to simulate
scarcity); "unlabelled" inside a partition means "label hidden from the client".

Personal test split: with ``personal_test_fraction`` > 0 each device also keeps a stratified held-out part
of its *own* utterances (``personal_test_utt_ids``: labelled, never trained on by the device, never seen by
the server). It measures what on-device adaptation is for: the model on that device's speaker(s), on
speech it has not trained on. Per class with at least two utterances, round(f * n_c) of them (at least
one, never all) by a rank of its own (a hash of seed and utt_id, independent of the label rank), so the
personal test set is the same at every label fraction; ``utt_ids`` are then the device's training
utterances only.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedsd.checkpoint import atomic_write_text, sha256_json
from fedsd.data.manifest import ManifestRow, label_names

PartitionBy = Literal["speaker", "dirichlet", "iid"]
PERSONAL_TEST = "personal_test"
"""Manifest ``split`` of a device's personal test rows (labelled, held out from its training)."""
PARTITION_MODES: tuple[str, ...] = ("speaker", "dirichlet", "iid")


class PartitionError(ValueError):
    """A partition that cannot be made or loaded; the message says which file or argument."""


class ClientPartition(BaseModel):
    """One simulated device: its training utterances, which of them it may see labels for, its personal
    test utterances (held out, labelled) and a summary (``class_histogram`` counts training utterances)."""

    model_config = ConfigDict(extra="forbid")

    client_id: str
    utt_ids: list[str]
    labelled: list[bool]
    speakers: list[str]
    class_histogram: dict[str, int]
    personal_test_utt_ids: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _mask_matches(self) -> ClientPartition:
        if len(self.labelled) != len(self.utt_ids):
            raise ValueError(
                f"client {self.client_id}: labelled mask has {len(self.labelled)} entries "
                f"for {len(self.utt_ids)} utterances"
            )
        return self

    @property
    def num_labelled(self) -> int:
        return sum(self.labelled)

    def labelled_utt_ids(self) -> list[str]:
        return [u for u, lab in zip(self.utt_ids, self.labelled, strict=True) if lab]

    def unlabelled_utt_ids(self) -> list[str]:
        return [u for u, lab in zip(self.utt_ids, self.labelled, strict=True) if not lab]


class Partition(BaseModel):
    """The whole federated split; saved as JSON next to the experiment that uses it."""

    model_config = ConfigDict(extra="forbid")

    config: dict[str, Any]
    seed: int
    label_names: list[str]
    test_utt_ids: list[str]
    test_speakers: list[str]
    server_utt_ids: list[str] = Field(default_factory=list)
    server_speakers: list[str] = Field(default_factory=list)
    clients: list[ClientPartition]

    @model_validator(mode="after")
    def _disjoint(self) -> Partition:
        ids = [c.client_id for c in self.clients]
        dup_ids = sorted(k for k, v in Counter(ids).items() if v > 1)
        if dup_ids:
            raise ValueError(f"client id(s) repeated: {', '.join(dup_ids)}")
        owner: dict[str, str] = {}
        groups = [("test", self.test_utt_ids), ("server", self.server_utt_ids)]
        groups += [(c.client_id, c.utt_ids) for c in self.clients]
        groups += [(f"{c.client_id} personal test", c.personal_test_utt_ids) for c in self.clients]
        for name, utts in groups:
            for u in utts:
                if u in owner:
                    raise ValueError(f"utterance {u!r} is in both {owner[u]} and {name}")
                owner[u] = name
        held_out = set(self.test_speakers)
        for c in self.clients:
            leaked = held_out.intersection(c.speakers)
            if leaked:
                raise ValueError(
                    f"test speaker(s) {', '.join(sorted(leaked))} appear in client {c.client_id}"
                )
        return self

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    @property
    def client_ids(self) -> list[str]:
        return [c.client_id for c in self.clients]

    def client(self, client_id_or_index: str | int) -> ClientPartition:
        """A client by id (``"client-003"``) or by 0-based index (Flower's ``partition-id``)."""
        key = client_id_or_index
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            if not 0 <= int(key) < len(self.clients):
                raise PartitionError(
                    f"client index {key} out of range; this partition has {len(self.clients)}"
                )
            return self.clients[int(key)]
        for c in self.clients:
            if c.client_id == key:
                return c
        if isinstance(key, str) and key.isdigit():
            return self.client(int(key))
        shown = ", ".join(self.client_ids[:8]) + (", ..." if len(self.clients) > 8 else "")
        raise PartitionError(f"no client {key!r}; clients are {shown}")

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically (a crash never leaves half a partition behind)."""
        return atomic_write_text(path, self.model_dump_json(indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Partition:
        path = Path(path)
        if not path.is_file():
            raise PartitionError(f"{path}: partition file not found")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PartitionError(f"{path}: not valid JSON ({exc})") from None
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
            more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
            raise PartitionError(f"{path}: invalid partition at {loc}: {first['msg']}{more}") from None


# ---------------------------------------------------------------------------------------------- making
def utterance_rank(seed: int, utt_id: str) -> int:
    """Fixed pseudo-random rank of an utterance for a seed; independent of everything else."""
    return int.from_bytes(hashlib.sha256(f"{seed}\x00{utt_id}".encode()).digest()[:8], "big")


def _stratified_mask(
    utt_ids: Sequence[str], labels: Sequence[str], take: Callable[[int], int], rank: Callable[[str], int]
) -> list[bool]:
    """Per class of ``n_c`` utterances, mark the ``take(n_c)`` with the lowest ``rank(utt_id)``."""
    mask = [False] * len(utt_ids)
    by_class: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        by_class.setdefault(lab, []).append(i)
    for members in by_class.values():
        for i in sorted(members, key=lambda j: rank(utt_ids[j]))[: take(len(members))]:
            mask[i] = True
    return mask


def labelled_mask(utt_ids: Sequence[str], labels: Sequence[str], fraction: float, seed: int) -> list[bool]:
    """Stratified, nested labelled subset: per class the ceil(fraction * n_c) lowest-ranked utterances.

    At least one per class present when ``fraction > 0``.
    """
    if fraction <= 0:
        return [False] * len(utt_ids)
    return _stratified_mask(
        utt_ids, labels, lambda n: min(n, max(1, math.ceil(fraction * n - 1e-9))), lambda u: utterance_rank(seed, u)
    )


def personal_test_mask(
    utt_ids: Sequence[str], labels: Sequence[str], fraction: float, seed: int
) -> list[bool]:
    """Stratified personal test subset of one device: per class with n_c >= 2 utterances, the
    ``max(1, round(fraction * n_c))`` (at most n_c - 1) lowest by a rank independent of the label rank."""
    if fraction <= 0:
        return [False] * len(utt_ids)
    return _stratified_mask(
        utt_ids,
        labels,
        lambda n: 0 if n < 2 else min(n - 1, max(1, math.floor(fraction * n + 0.5))),
        lambda u: utterance_rank(seed, f"personal-test\x00{u}"),
    )


def _deal_speakers(
    speakers: list[str], counts: Counter[str], n: int, rng: np.random.Generator
) -> list[list[str]]:
    """Largest-first greedy: balance utterance counts across n clients, each speaker on one client."""
    tiebreak = {s: float(x) for s, x in zip(speakers, rng.random(len(speakers)), strict=True)}
    order = sorted(speakers, key=lambda s: (-counts[s], tiebreak[s]))
    groups: list[list[str]] = [[] for _ in range(n)]
    load = [0] * n
    for s in order:
        k = min(range(n), key=lambda j: (load[j], j))
        groups[k].append(s)
        load[k] += counts[s]
    return groups


def _repair_sizes(groups: list[list[int]], labels: Sequence[str], min_size: int) -> None:
    """Move utterances from the largest client to those under ``min_size`` (most common class first)."""
    while True:
        small = [k for k, g in enumerate(groups) if len(g) < min_size]
        if not small:
            return
        donor = max(range(len(groups)), key=lambda k: (len(groups[k]), -k))
        if len(groups[donor]) <= min_size:
            raise PartitionError("not enough utterances to give every client min_per_client of them")
        common = Counter(labels[i] for i in groups[donor]).most_common(1)[0][0]
        pick = next(i for i in reversed(groups[donor]) if labels[i] == common)
        groups[donor].remove(pick)
        groups[small[0]].append(pick)


def _dirichlet_utterances(
    labels: Sequence[str], names: list[str], n: int, alpha: float, min_size: int, rng: np.random.Generator
) -> list[list[int]]:
    """Per class, split its utterances over clients with proportions ~ Dir(alpha); resample, then repair."""
    groups: list[list[int]] = []
    for _attempt in range(20):
        groups = [[] for _ in range(n)]
        for c in names:
            idx = np.array([i for i, lab in enumerate(labels) if lab == c], dtype=int)
            rng.shuffle(idx)
            p = rng.dirichlet(np.full(n, alpha))
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
            for k, part in enumerate(np.split(idx, cuts)):
                groups[k].extend(int(i) for i in part)
        if min(len(g) for g in groups) >= min_size:
            return groups
    _repair_sizes(groups, labels, min_size)
    return groups


def _dirichlet_speakers(
    speakers: list[str],
    hist: dict[str, np.ndarray],
    n: int,
    alpha: float,
    min_size: int,
    rng: np.random.Generator,
) -> list[list[str]]:
    """Whole speakers to clients so that each client's class mix follows Dir(alpha) targets.

    Per class c, target shares P[c] ~ Dir(alpha) over clients give quotas P[c, k] * total_c. Speakers, largest
    first, go to the client whose remaining quotas absorb most of their utterances (ties: the least
    over-full client). Then empty clients take a speaker from the client with the most speakers. Where every
    speaker acts every emotion equally, skew is limited by design: a speaker is indivisible.
    """
    total = sum(hist.values())
    quota = rng.dirichlet(np.full(n, alpha), size=len(total)) * total[:, None]  # classes x clients
    tiebreak = dict(zip(speakers, rng.random(len(speakers)), strict=True))
    order = sorted(speakers, key=lambda s: (-int(hist[s].sum()), tiebreak[s]))
    groups: list[list[str]] = [[] for _ in range(n)]
    for s in order:
        h = hist[s]
        fit = np.minimum(h[:, None], np.maximum(quota, 0)).sum(axis=0)
        slack = h @ quota
        k = max(range(n), key=lambda j: (round(float(fit[j]), 9), float(slack[j]), -j))
        groups[k].append(s)
        quota[:, k] -= h

    def size(g: list[str]) -> int:
        return int(sum(hist[s].sum() for s in g))

    for _ in range(len(speakers) * n + 1):
        small = [k for k, g in enumerate(groups) if size(g) < min_size]
        if not small:
            return groups
        donors = [k for k, g in enumerate(groups) if len(g) > 1 and k not in small]
        if not donors:
            break
        donor = max(donors, key=lambda k: (len(groups[k]), size(groups[k]), -k))
        s = min(groups[donor], key=lambda x: (int(hist[x].sum()), x))
        groups[donor].remove(s)
        groups[small[0]].append(s)
    raise PartitionError(
        f"cannot give each of {n} clients at least {min_size} utterance(s) with whole speakers"
    )


@dataclass(frozen=True)
class _Options:
    """``make_partition``'s settings, checked once and passed to the steps below as one bundle."""

    num_clients: int | None
    by: PartitionBy
    alpha: float
    label_fraction: float
    test_speakers: int
    server_speakers: int
    seed: int
    keep_speakers: bool
    min_per_client: int
    personal_test_fraction: float

    def check(self) -> None:
        if self.by not in PARTITION_MODES:
            raise PartitionError(f"unknown partition mode {self.by!r}; use one of {', '.join(PARTITION_MODES)}")
        if not 0.0 <= self.personal_test_fraction < 1.0:
            raise PartitionError(f"personal_test_fraction must be in [0, 1), got {self.personal_test_fraction}")
        if not 0.0 <= self.label_fraction <= 1.0:
            raise PartitionError(f"label_fraction must be in [0, 1], got {self.label_fraction}")
        if not self.alpha > 0:
            raise PartitionError(f"alpha must be positive, got {self.alpha}")
        if self.test_speakers < 0 or self.server_speakers < 0:
            raise PartitionError("test_speakers and server_speakers must be >= 0")
        if self.seed < 0:
            raise PartitionError(f"seed must be >= 0, got {self.seed}")
        if self.min_per_client < 1:
            raise PartitionError(f"min_per_client must be >= 1, got {self.min_per_client}")
        if self.num_clients is not None and self.num_clients < 1:
            raise PartitionError(f"num_clients must be >= 1, got {self.num_clients}")
        if self.num_clients is None and self.by != "speaker":
            raise PartitionError(
                f"by={self.by} needs num_clients (only by=speaker can make one client per speaker)"
            )
        if self.keep_speakers and self.by == "iid":
            raise PartitionError("keep_speakers applies to by=dirichlet (by=speaker always keeps speakers whole)")

    def record(self, pool: Sequence[ManifestRow], declared: set[str]) -> dict[str, Any]:
        """The partition's ``config``: these settings and the identity of the rows partitioned."""
        config: dict[str, Any] = {
            "by": self.by,
            "num_clients": self.num_clients,
            "alpha": self.alpha if self.by == "dirichlet" else None,
            "label_fraction": self.label_fraction,
            "test_speakers": self.test_speakers,
            "server_speakers": self.server_speakers,
            "keep_speakers": self.keep_speakers,
            "min_per_client": self.min_per_client,
            "personal_test_fraction": self.personal_test_fraction,
            "num_rows": len(pool),
            "rows_sha256": sha256_json(sorted((r.utt_id, r.label, r.speaker) for r in pool)),
        }
        if declared:
            config["test_first"] = sorted(declared)
        return config


@dataclass(frozen=True)
class _SpeakerSplit:
    """Speakers held out for test and for the server, the rest for clients; ``declared``: split=test ones."""

    test: list[str]
    server: list[str]
    clients: list[str]
    declared: set[str]


def _labelled_pool(rows: Sequence[ManifestRow]) -> list[ManifestRow]:
    pool = [r for r in rows if r.label]
    if not pool:
        raise PartitionError("no labelled rows to partition")
    dup = [u for u, c in Counter(r.utt_id for r in pool).items() if c > 1]
    if dup:
        raise PartitionError(f"utterance id(s) repeated in the manifest: {', '.join(sorted(dup)[:5])}")
    return pool


def _split_speakers(speakers: list[str], opts: _Options, test_first: Sequence[str]) -> _SpeakerSplit:
    """Test speakers first (declared ones before the others), then server speakers, by seed."""
    held = opts.test_speakers + opts.server_speakers
    if held >= len(speakers):
        raise PartitionError(
            f"{len(speakers)} speaker(s) cannot cover {opts.test_speakers} test + {opts.server_speakers} "
            "server speaker(s) and leave any for clients"
        )
    spk_rng = np.random.default_rng([opts.seed, 0])
    shuffled = [speakers[i] for i in spk_rng.permutation(len(speakers))]
    declared = set(test_first) & set(speakers)
    if declared:
        shuffled = [s for s in shuffled if s in declared] + [s for s in shuffled if s not in declared]
    rest = shuffled[opts.test_speakers :]
    server_pool = [s for s in rest if s not in declared]
    if len(server_pool) < opts.server_speakers:
        raise PartitionError(
            f"{opts.server_speakers} server speaker(s) requested, but only {len(server_pool)} speaker(s) are "
            f"neither test speakers nor declared held out (split=test: {len(declared)})"
        )
    server = sorted(server_pool[: opts.server_speakers])
    clients = sorted(s for s in rest if s not in set(server))
    return _SpeakerSplit(sorted(shuffled[: opts.test_speakers]), server, clients, declared)


def _speaker_groups(
    cand: Sequence[ManifestRow], names: list[str], split: _SpeakerSplit, n: int, opts: _Options,
    rng: np.random.Generator,
) -> list[list[int]]:  # fmt: skip
    """Clients of whole speakers (``by=speaker``, or ``dirichlet`` with ``keep_speakers``): row indices."""
    client_spk = split.clients
    if n > len(client_spk):
        raise PartitionError(
            f"{n} clients need at least {n} speakers, but only {len(client_spk)} remain "
            f"after holding out {opts.test_speakers + opts.server_speakers}"
        )
    if opts.by == "speaker":
        spk_counts = Counter(r.speaker for r in cand)
        spk_groups = (
            [[s] for s in client_spk]
            if opts.num_clients is None
            else _deal_speakers(client_spk, spk_counts, n, rng)
        )
        if opts.min_per_client > 1 and min(sum(spk_counts[s] for s in g) for g in spk_groups) < opts.min_per_client:
            raise PartitionError(f"some client has fewer than min_per_client={opts.min_per_client} utterances")
    else:
        hist = {s: np.zeros(len(names)) for s in client_spk}
        for r in cand:
            hist[r.speaker][names.index(r.label)] += 1
        spk_groups = _dirichlet_speakers(client_spk, hist, n, opts.alpha, opts.min_per_client, rng)
    where = {s: k for k, g in enumerate(spk_groups) for s in g}
    groups: list[list[int]] = [[] for _ in range(n)]
    for i, r in enumerate(cand):
        groups[where[r.speaker]].append(i)
    return groups


def _utterance_groups(
    labels: list[str], names: list[str], n: int, opts: _Options, rng: np.random.Generator
) -> list[list[int]]:
    """Clients of single utterances (``iid``, or ``dirichlet`` over utterances): row indices."""
    if len(labels) < n * opts.min_per_client:
        raise PartitionError(f"{len(labels)} utterances cannot give {n} clients {opts.min_per_client} each")
    if opts.by == "iid":
        perm = rng.permutation(len(labels))
        return [sorted(int(i) for i in perm[k::n]) for k in range(n)]
    return _dirichlet_utterances(labels, names, n, opts.alpha, opts.min_per_client, rng)


def _client(
    client_id: str, g: list[int], cand: Sequence[ManifestRow], names: list[str], opts: _Options
) -> ClientPartition:
    """One client from its row indices: personal test rows held out, the rest labelled by fraction."""
    g = sorted(g)  # manifest order
    held = personal_test_mask([cand[i].utt_id for i in g], [cand[i].label for i in g],
                              opts.personal_test_fraction, opts.seed)  # fmt: skip
    train_idx = [i for i, h in zip(g, held, strict=True) if not h]
    utts = [cand[i].utt_id for i in train_idx]
    labs = [cand[i].label for i in train_idx]
    counts = Counter(labs)
    return ClientPartition(
        client_id=client_id,
        utt_ids=utts,
        labelled=labelled_mask(utts, labs, opts.label_fraction, opts.seed),
        speakers=sorted({cand[i].speaker for i in g}),
        class_histogram={c: counts.get(c, 0) for c in names},
        personal_test_utt_ids=[cand[i].utt_id for i, h in zip(g, held, strict=True) if h],
    )


def make_partition(
    rows: Sequence[ManifestRow],
    *,
    num_clients: int | None,
    by: PartitionBy = "speaker",
    alpha: float = 0.5,
    label_fraction: float = 1.0,
    test_speakers: int = 0,
    server_speakers: int = 0,
    seed: int = 0,
    keep_speakers: bool = False,
    min_per_client: int = 1,
    personal_test_fraction: float = 0.0,
    test_first: Sequence[str] = (),
) -> Partition:
    """Hold out ``test_speakers`` unseen speakers, then ``server_speakers``, then form clients from the rest.

    ``by="speaker"``: one client per speaker (``num_clients=None``) or speakers dealt into N clients
    balanced by utterance count. ``by="dirichlet"``: per-class proportions ~ Dir(alpha) over N clients
    (utterance level, or whole speakers with ``keep_speakers``). ``by="iid"``: shuffle and deal.
    ``personal_test_fraction``: per device, that stratified share of its utterances is held out as its
    personal test set (see the module docstring). Deterministic per ``seed``.
    ``test_first``: speakers declared held out (a manifest's ``split=test``): the test speakers are drawn
    from them first (then from the rest if more are asked), and none of them is ever a server speaker, so
    a model trained on the server pool never saw one. Empty: the draw is exactly as before.
    """
    opts = _Options(num_clients, by, alpha, label_fraction, test_speakers, server_speakers, seed,
                    keep_speakers, min_per_client, personal_test_fraction)  # fmt: skip
    opts.check()
    pool = _labelled_pool(rows)
    names = label_names(pool)
    split = _split_speakers(sorted({r.speaker for r in pool}), opts, test_first)
    test_set, server_set = set(split.test), set(split.server)
    cand = [r for r in pool if r.speaker not in test_set and r.speaker not in server_set]
    rng = np.random.default_rng([seed, 1])
    n = num_clients if num_clients is not None else len(split.clients)
    if by == "speaker" or (by == "dirichlet" and keep_speakers):
        groups = _speaker_groups(cand, names, split, n, opts, rng)
    else:
        groups = _utterance_groups([r.label for r in cand], names, n, opts, rng)
    width = max(3, len(str(n - 1)))
    return Partition(
        config=opts.record(pool, split.declared),
        seed=seed,
        label_names=names,
        test_utt_ids=[r.utt_id for r in pool if r.speaker in test_set],
        test_speakers=split.test,
        server_utt_ids=[r.utt_id for r in pool if r.speaker in server_set],
        server_speakers=split.server,
        clients=[_client(f"client-{k:0{width}d}", g, cand, names, opts) for k, g in enumerate(groups)],
    )


def device_manifest_rows(part: Partition, client: str | int, rows: Sequence[ManifestRow]) -> list[ManifestRow]:
    """What one device's manifest holds: its training rows (``split=train``, the label blanked where the
    device may not see it) and its personal test rows (``split=personal_test``, labelled)."""
    from dataclasses import replace

    from fedsd.data.dataset import rows_by_ids

    c = part.client(client)
    train = [
        replace(r, label=r.label if lab else "", split="train")
        for r, lab in zip(rows_by_ids(rows, c.utt_ids), c.labelled, strict=True)
    ]
    return train + [replace(r, split=PERSONAL_TEST) for r in rows_by_ids(rows, c.personal_test_utt_ids)]


def write_device_manifests(
    part: Partition, rows: Sequence[ManifestRow], out_dir: str | os.PathLike[str]
) -> list[Path]:
    """One manifest per device, ``<out_dir>/<client_id>.csv`` (see :func:`device_manifest_rows`)."""
    from fedsd.data.manifest import write_manifest

    return [
        write_manifest(device_manifest_rows(part, c.client_id, rows), Path(out_dir) / f"{c.client_id}.csv")
        for c in part.clients
    ]


def partition_manifest(
    manifest: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    device_manifests: str | os.PathLike[str] | None = None,
    **options: Any,
) -> tuple[Partition, list[Path]]:
    """Read ``manifest``, :func:`make_partition` it (``options``), save the partition JSON to ``out``.

    The partition records which manifest it came from. With ``device_manifests`` one manifest per device
    is also written there (:func:`write_device_manifests`); their paths are returned (else ``[]``).
    """
    from fedsd.data.manifest import read_manifest

    rows = read_manifest(manifest)
    part = make_partition(rows, **options)
    part.config["manifest"] = str(manifest)
    part.save(out)
    paths = write_device_manifests(part, rows, device_manifests) if device_manifests is not None else []
    return part, paths
