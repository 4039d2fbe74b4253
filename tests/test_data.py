"""The data package: tokenizers, sources (embedded / text / hf, all local), packing, the resumable dp-sharded loader,
and DataConfig validation. Nothing here touches the network."""

from __future__ import annotations

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # belt and braces: every dataset below is local
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import collections  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from moe_train.config.store import register_configs  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from moe_train.config.data import DataConfig, validate_data_config  # noqa: E402
from moe_train.data import embedded  # noqa: E402
from moe_train.data import (  # noqa: E402
    DOMAINS, ByteTokenizer, TokenLoader, ValidationBatches, build_data, build_tokenizer, domain_labels,
    embedded_documents, encode_documents, iter_documents, load_hf_tokenizer, pack_sequences, split_stream)

REPO = pathlib.Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


def _cfg(tmp_path, **kw) -> DataConfig:
    return DataConfig(cache_dir=str(tmp_path / "hf_cache"), **kw)


def _val_rows(bundle) -> torch.Tensor:
    """The packed validation rows (seq_len + 1 tokens each), rebuilt from (inputs, targets), concatenated."""
    return torch.cat([torch.cat([x, y[:, -1:]], dim=1).flatten() for x, y in bundle.val])


# ---------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "Hello, wörld! 37+45=82 \u2603"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < tok.vocab_size == 256
    assert tok.decode(ids) == text
    assert tok.separator == [0]
    assert tok.decode([0xFF, 104]) == "\ufffdh"  # invalid UTF-8 is replaced, not raised


@pytest.fixture
def hf_tokenizer_dir(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[UNK]", "</s>"])
    tok.train_from_iterator(["the cat sat on the mat", "the dog ran", "a cat and a dog"], trainer)
    directory = tmp_path / "tok"
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))
    return directory


def test_hf_tokenizer_from_file_and_directory(hf_tokenizer_dir):
    for spec in (hf_tokenizer_dir / "tokenizer.json", hf_tokenizer_dir):
        tok = build_tokenizer(DataConfig(tokenizer=str(spec)))
        assert tok.vocab_size == 11  # 9 words + [UNK] + </s>
        assert tok.eos_id == tok.encode("</s>")[0] and tok.separator == [tok.eos_id]
        ids = tok.encode("the cat sat")
        assert len(ids) == 3 and tok.decode(ids) == "the cat sat"


def test_hf_tokenizer_eos_from_tokenizer_config(hf_tokenizer_dir):
    (hf_tokenizer_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "[UNK]"}}))
    assert load_hf_tokenizer(str(hf_tokenizer_dir)).eos_id == 0


def test_hf_tokenizer_bad_paths(tmp_path):
    with pytest.raises(ValueError, match=r"data\.tokenizer='.*nope\.json' does not exist; allowed: 'byte'"):
        build_tokenizer(DataConfig(tokenizer=str(tmp_path / "nope.json")))
    with pytest.raises(ValueError, match=r"data\.tokenizer='.*' is a directory without tokenizer\.json"):
        build_tokenizer(DataConfig(tokenizer=str(tmp_path)))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"data\.tokenizer='.*bad\.json'.*not a valid tokenizer\.json"):
        build_tokenizer(DataConfig(tokenizer=str(tmp_path / "bad.json")))


def test_build_data_with_hf_tokenizer(hf_tokenizer_dir):
    cfg = DataConfig(tokenizer=str(hf_tokenizer_dir), embedded_size=20_000)
    bundle = build_data(cfg, seq_len=16, micro_batch_size=2)
    x, y = bundle.train.next_batch()
    assert bundle.vocab_size == 11 and int(x.max()) < 11 and x.shape == y.shape == (2, 16)


# ---------------------------------------------------------------- embedded corpus


def test_embedded_is_deterministic_sized_and_multi_domain():
    random.seed(1)
    a = embedded_documents(200_000)
    random.seed(2)
    torch.manual_seed(2)
    b = embedded_documents(200_000)
    assert a == b  # independent of the global RNGs
    assert sum(len(t.encode()) for _, t in a) == 200_000
    assert {d for d, _ in a} == set(DOMAINS) and len(DOMAINS) >= 3
    small = embedded_documents(50_000)
    assert small[:-1] == a[: len(small) - 1]  # a smaller corpus is a prefix of a larger one


def test_embedded_megabyte_is_exact_and_ascii():
    docs = embedded_documents(1_000_000)  # well under a second; its speed is not asserted (no timing in tests)
    assert sum(len(t) for _, t in docs) == 1_000_000
    assert all(t.isascii() for _, t in docs)  # one byte per character: the sizes above are bytes


def test_embedded_arithmetic_is_correct():
    math_text = "".join(t for d, t in embedded_documents(100_000) if d == "math")
    equations = re.findall(r"^(\d+)([+\-*])(\d+)=(\d+)$", math_text, flags=re.M)
    assert len(equations) > 500
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    assert all(ops[op](int(a), int(b)) == int(c) for a, op, b, c in equations)


class _DrawRecorder(random.Random):
    """A Random that adds up the log-count of every draw the generators make (what they draw, shown or not)."""

    def __init__(self, seed):
        super().__init__(seed)
        self.nats = 0.0

    def getrandbits(self, k):  # keeps choice/randint on getrandbits, so overriding random() below counts once
        return super().getrandbits(k)

    def random(self):  # the generators only test random() < 0.5: one bit
        self.nats += math.log(2)
        return super().random()

    def choice(self, seq):
        self.nats += math.log(len(seq))
        return super().choice(seq)

    def randint(self, a, b):
        self.nats += math.log(b - a + 1)
        return super().randint(a, b)

    def sample(self, population, k, **kw):
        self.nats += math.log(math.perm(len(population), k))
        return super().sample(population, k, **kw)


def _mean_drawn_nats(generator, n: int = 3000) -> tuple[float, float]:
    """(mean, standard error) of the nats a generator draws per document."""
    rng, values = _DrawRecorder(7), []
    for _ in range(n):
        before = rng.nats
        generator(rng)
        values.append(rng.nats - before)
    return float(np.mean(values)), float(np.std(values) / math.sqrt(n))


def _plugin_entropy(sample, n: int) -> float:
    """Miller-Madow corrected plug-in entropy (nats) of the texts `sample()` returns, from n draws."""
    counts = np.array(list(collections.Counter(sample() for _ in range(n)).values()), dtype=np.float64)
    p = counts / n
    return float(-(p * np.log(p)).sum() + (len(counts) - 1) / (2 * n))


@pytest.mark.parametrize("domain", ["code", "csv", "json", "dialogue"])
def test_embedded_document_entropy_matches_the_draws(domain):
    """Where every draw shows in the text, the expected entropy is the mean of what the generator draws."""
    mean, se = _mean_drawn_nats(embedded.GENERATORS[domain])
    assert abs(mean - embedded.DOCUMENT_ENTROPY[domain]()) < 4 * se + 1e-3, (domain, mean, se)


@pytest.mark.parametrize("domain, part, repeats, entropy", [
    ("story", "_sentence", 5.5, embedded.sentence_entropy), ("math", "_equation", 11, embedded.equation_entropy)])
def test_embedded_document_entropy_of_repeated_parts(monkeypatch, domain, part, repeats, entropy):
    """Story sentences draw forms they drop, and `a-b` hides the order of its draws: their parts are checked against
    sampled texts, the rest of the document against its draws with the part drawing nothing."""
    rng = random.Random(3)
    args = ("anna",) if part == "_sentence" else ()
    estimate = _plugin_entropy(lambda: getattr(embedded, part)(rng, *args), 200_000)
    assert abs(estimate - entropy()) < 0.02, (part, estimate, entropy())
    monkeypatch.setattr(embedded, part, lambda *a: "x")
    mean, se = _mean_drawn_nats(embedded.GENERATORS[domain])
    assert abs(mean - (embedded.DOCUMENT_ENTROPY[domain]() - repeats * entropy())) < 4 * se + 1e-3


def test_embedded_entropy_floor_weights_domains_by_tokens():
    docs = embedded_documents(300_000)
    floor = embedded.entropy_floor(docs)
    assert set(floor) == {*DOMAINS, "all"}
    tokens = {d: sum(len(t) + 1 for dd, t in docs if dd == d) for d in DOMAINS}
    mixed = sum(floor[d] * tokens[d] for d in DOMAINS) / sum(tokens.values())
    assert floor["all"] == pytest.approx(mixed)
    assert 0.1 < floor["all"] < 0.4 and floor["math"] > floor["all"] > floor["dialogue"]


def _entropy(values: np.ndarray) -> float:
    p = np.unique(values, return_counts=True)[1] / len(values)
    return float(-(p * np.log2(p)).sum())


def _conditional_entropy(b: np.ndarray, order: int) -> float:
    """Plug-in H(x_t | x_{t-order..t-1}) in bits = H(context, x_t) - H(context)."""
    b = b.astype(np.int64)
    ctx = np.zeros(len(b) - order, dtype=np.int64)
    for k in range(order, 0, -1):
        ctx = ctx * 256 + b[order - k: len(b) - k]
    return _entropy(ctx * 256 + b[order:]) - _entropy(ctx)


def test_embedded_corpus_is_learnable():
    """A 3-byte-context model beats the unigram entropy by a wide margin; on the same bytes shuffled (same unigram,
    no structure) it does not: the drop is structure, not estimator bias."""
    text = "".join(t for _, t in embedded_documents(300_000))
    b = np.frombuffer(text.encode(), dtype=np.uint8)
    unigram, trigram = _entropy(b), _conditional_entropy(b, 3)
    shuffled = _conditional_entropy(np.random.default_rng(0).permutation(b), 3)
    assert unigram > 4.0 and trigram < unigram - 2.0 and trigram < shuffled - 1.5, (unigram, trigram, shuffled)


def test_domain_labels_align_with_stream():
    pairs = embedded_documents(5_000)
    tok = ByteTokenizer()
    tokens, labels = encode_documents([t for _, t in pairs], tok), domain_labels(pairs, tok, DOMAINS)
    assert labels.shape == tokens.shape
    first = len(pairs[0][1].encode()) + 1  # the separator belongs to the document it ends
    assert (labels[:first] == DOMAINS.index(pairs[0][0])).all() and tokens[first - 1] == 0


# ---------------------------------------------------------------- text source


def test_text_source_round_trip(tmp_path):
    path = tmp_path / "corpus.txt"
    content = "".join(f"line {i}: the quick brown fox\n" for i in range(400))
    path.write_text(content)
    cfg = _cfg(tmp_path, source="text", path=str(path))
    assert list(iter_documents(cfg)) == [content]  # the whole file, one document, bytes kept exactly
    bundle = build_data(cfg, seq_len=32, micro_batch_size=4)
    n = len(content) + 1  # + the separator byte
    assert bundle.num_train_tokens == int(n * 0.9) and bundle.num_train_tokens + bundle.num_val_tokens == n
    val_text = ByteTokenizer().decode(_val_rows(bundle).tolist())
    assert val_text == (content + "\0")[bundle.num_train_tokens:][: len(val_text)]


def test_text_source_streaming(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("abc\ndef\n" * 10)
    assert list(iter_documents(_cfg(tmp_path, source="text", path=str(path), streaming=True))) == ["abc\ndef\n" * 10]


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"{SHAKESPEARE} not present")
def test_text_source_tinyshakespeare(tmp_path):
    cfg = _cfg(tmp_path, source="text", path=str(SHAKESPEARE))
    bundle = build_data(cfg, seq_len=256, micro_batch_size=8, val_batches=3)
    n = SHAKESPEARE.stat().st_size + 1
    assert bundle.num_train_tokens == int(n * 0.9) and len(bundle.val) == 3
    x, _ = bundle.train.next_batch()
    assert x.shape == (8, 256) and int(x.max()) < 128  # ASCII


def test_text_source_missing_and_empty(tmp_path):
    with pytest.raises(ValueError, match=r"data\.path='.*missing\.txt' does not exist"):
        list(iter_documents(_cfg(tmp_path, source="text", path=str(tmp_path / "missing.txt"))))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match=r"data\.path='.*empty\.txt' is empty"):
        list(iter_documents(_cfg(tmp_path, source="text", path=str(tmp_path / "empty.txt"))))


# ---------------------------------------------------------------- hf source

ROWS = {"text": [f"document number {i} " * 5 for i in range(60)], "label": list(range(60))}


def test_hf_source_save_to_disk(tmp_path):
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict(ROWS).save_to_disk(str(saved))
    for kw in (dict(path=str(saved)), dict(name=str(saved)), dict(path=str(saved), streaming=True)):
        assert list(iter_documents(_cfg(tmp_path, source="hf", **kw))) == ROWS["text"]


def test_hf_source_dataset_dict_split(tmp_path):
    saved = tmp_path / "dd"
    ds = datasets.Dataset.from_dict(ROWS)
    datasets.DatasetDict({"train": ds, "test": ds.select(range(3))}).save_to_disk(str(saved))
    assert list(iter_documents(_cfg(tmp_path, source="hf", path=str(saved), split="test"))) == ROWS["text"][:3]
    with pytest.raises(ValueError, match=r"data\.split='dev'.*available splits: \['test', 'train'\]"):
        iter_documents(_cfg(tmp_path, source="hf", path=str(saved), split="dev"))


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(ROWS["text"])))
    return path


@pytest.mark.parametrize("streaming", [False, True])
def test_hf_source_jsonl(tmp_path, jsonl, streaming):
    cfg = _cfg(tmp_path, source="hf", path=str(jsonl), text_field="body", streaming=streaming)
    assert list(iter_documents(cfg)) == ROWS["text"]
    bundle = build_data(cfg, seq_len=20, micro_batch_size=2)
    assert bundle.num_train_tokens + bundle.num_val_tokens == sum(len(t) + 1 for t in ROWS["text"])


def test_hf_source_max_tokens_stops_reading(tmp_path, jsonl):
    cfg = _cfg(tmp_path, source="hf", path=str(jsonl), text_field="body", streaming=True, max_tokens=500)
    bundle = build_data(cfg, seq_len=20, micro_batch_size=2)
    assert bundle.num_train_tokens + bundle.num_val_tokens == 500


@pytest.mark.parametrize("streaming", [False, True])
def test_hf_source_missing_text_field(tmp_path, jsonl, streaming):
    cfg = _cfg(tmp_path, source="hf", path=str(jsonl), streaming=streaming)  # text_field="text" is absent
    with pytest.raises(ValueError, match=r"data\.text_field='text' is not a column.*available columns: \['body', "
                                         r"'id'\]"):
        list(iter_documents(cfg))


def test_hf_source_bad_local_path(tmp_path):
    with pytest.raises(ValueError, match=r"data\.path='.*nothing' is not a save_to_disk directory"):
        iter_documents(_cfg(tmp_path, source="hf", path=str(tmp_path / "nothing")))


# ---------------------------------------------------------------- packing and split


def test_split_and_pack_take_the_right_ends():
    stream = torch.arange(1000, dtype=torch.int32)
    train, val = split_stream(stream, 0.1)
    assert train.tolist() == list(range(900)) and val.tolist() == list(range(900, 1000))
    rows = pack_sequences(train, seq_len=7)
    assert rows.shape == (112, 8) and rows[1].tolist() == list(range(8, 16))  # non-overlapping, tail dropped
    val_batches = ValidationBatches(val, seq_len=9, micro_batch_size=3)
    (x, y), = list(val_batches)[:1]
    assert x[0].tolist() == list(range(900, 909)) and y[0].tolist() == list(range(901, 910))
    assert x.dtype == y.dtype == torch.int64


def test_targets_are_inputs_shifted_by_one():
    loader = TokenLoader(torch.arange(5000, dtype=torch.int32), seq_len=16, micro_batch_size=4, seed=3)
    for _ in range(5):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (4, 16)
        assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y[:, -1], x[:, -1] + 1)
        assert (x[:, 0] % 17 == 0).all()  # every row starts on a seq_len + 1 boundary


# ---------------------------------------------------------------- loader


def _loader(**kw) -> TokenLoader:
    args = dict(tokens=torch.arange(17 * 50, dtype=torch.int32), seq_len=16, micro_batch_size=4, seed=7)
    return TokenLoader(**{**args, **kw})


def _row_ids(x: torch.Tensor) -> list[int]:
    return (x[:, 0] // 17).tolist()


def test_loader_is_deterministic_and_shuffles_per_epoch():
    a, b = _loader(), _loader()
    batches = [a.next_batch()[0] for _ in range(2 * a.batches_per_epoch)]
    assert all(torch.equal(x, b.next_batch()[0]) for x in batches)
    per_epoch = a.batches_per_epoch
    epoch0 = sum((_row_ids(x) for x in batches[:per_epoch]), [])
    epoch1 = sum((_row_ids(x) for x in batches[per_epoch:]), [])
    assert len(set(epoch0)) == len(epoch0) == 48 and epoch0 != epoch1  # 50 rows, 2 dropped as remainder
    assert _row_ids(_loader(seed=8).next_batch()[0]) != _row_ids(batches[0])


@pytest.mark.parametrize("consumed", [0, 5, 12, 13, 30])  # 12 batches per epoch: around the epoch boundary
def test_state_dict_restores_exact_next_batches(consumed):
    original = _loader()
    for _ in range(consumed):
        original.next_batch()
    state = original.state_dict()
    assert all(type(v) is int for v in state.values())
    restored = _loader()
    restored.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
    for _ in range(15):
        assert torch.equal(original.next_batch()[0], restored.next_batch()[0])


def test_state_resumes_under_another_dp_size_and_refuses_other_data():
    two = [_loader(dp_size=2, dp_rank=r, micro_batch_size=2) for r in range(2)]
    for loader in two:
        for _ in range(3):
            loader.next_batch()
    single = _loader(micro_batch_size=2)
    single.load_state_dict(two[0].state_dict())  # 6 global micro-batches consumed
    expected = _loader(micro_batch_size=2)
    for _ in range(6):
        expected.next_batch()
    assert torch.equal(single.next_batch()[0], expected.next_batch()[0])
    with pytest.raises(ValueError, match=r"loader state seed=7 does not match this loader's seed=8"):
        _loader(seed=8).load_state_dict(_loader().state_dict())
    with pytest.raises(ValueError, match=r"consumed=3 micro-batches cannot be split over dp_size=2"):
        _loader(dp_size=2).load_state_dict({**_loader().state_dict(), "consumed": 3})


def test_one_process_step_uses_the_micro_batches_of_all_dp_ranks_together():
    """Step s with 4 accumulation steps on one process = step s with 2 each on 2 ranks, micro-batch by micro-batch."""
    single = _loader(micro_batch_size=2)
    ranks = [_loader(dp_size=2, dp_rank=r, micro_batch_size=2) for r in range(2)]
    for _ in range(3):
        one = [_row_ids(single.next_batch()[0]) for _ in range(4)]
        split = [[_row_ids(r.next_batch()[0]) for _ in range(2)] for r in ranks]
        assert sorted(one) == sorted(split[0] + split[1]) and one[0::2] == split[0]


def test_dp_ranks_see_disjoint_equal_shares():
    ranks = [_loader(dp_rank=r, dp_size=3, micro_batch_size=2) for r in range(3)]
    assert {r.batches_per_epoch for r in ranks} == {8}  # 50 rows -> 48 usable -> 16 per rank -> 8 batches
    seen = [sum((_row_ids(r.next_batch()[0]) for _ in range(8)), []) for r in ranks]
    assert all(len(s) == 16 for s in seen)
    assert len(set().union(*map(set, seen))) == 48  # pairwise disjoint within the epoch


def test_validation_batches_fixed_and_sharded():
    val = torch.arange(17 * 20, dtype=torch.int32)
    v0 = ValidationBatches(val, seq_len=16, micro_batch_size=2, dp_rank=0, dp_size=2, max_batches=3)
    v1 = ValidationBatches(val, seq_len=16, micro_batch_size=2, dp_rank=1, dp_size=2)
    # v0: global micro-batch 0 of the first 3, rounded down to 2 (a multiple of dp_size: every rank runs as many)
    assert len(v0) == 1 and len(v1) == 5
    assert [_row_ids(x) for x, _ in v0] == [_row_ids(x) for x, _ in v0] == [[0, 1]]
    assert [_row_ids(x) for x, _ in v1][0] == [2, 3]


def test_too_little_data_names_the_sizes():
    with pytest.raises(ValueError, match=r"too little training data: 2 sequences of seq_len\+1=17 tokens .*"
                                         r"micro_batch_size=4 per rank x dp_size=1"):
        TokenLoader(torch.arange(40, dtype=torch.int32), seq_len=16, micro_batch_size=4)
    with pytest.raises(ValueError, match=r"too little validation data: 0 sequences"):
        build_data(DataConfig(embedded_size=2_000), seq_len=256, micro_batch_size=1)
    with pytest.raises(ValueError, match=r"dp_rank=2, dp_size=2"):
        _loader(dp_rank=2, dp_size=2)


# ---------------------------------------------------------------- config

BAD = [
    (dict(source="web"), r"data\.source='web' is not supported; allowed: 'embedded', 'text', 'hf'"),
    (dict(val_fraction=0.0), r"data\.val_fraction=0\.0 .*strictly between 0 and 1"),
    (dict(val_fraction=1.0), r"data\.val_fraction=1\.0"),
    (dict(val_fraction=float("nan")), r"data\.val_fraction=nan"),
    (dict(source="text"), r"data\.path=None .*required for data\.source='text'"),
    (dict(source="hf"), r"data\.name=None and data\.path=None: data\.source='hf' needs one of them"),
    (dict(embedded_size=0), r"data\.embedded_size=0"),
    (dict(max_tokens=0), r"data\.max_tokens=0"),
    (dict(seed=-1), r"data\.seed=-1"),
    (dict(tokenizer=""), r"data\.tokenizer='' .*non-empty string"),
    (dict(text_field=""), r"data\.text_field=''"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[m for _, m in BAD])
def test_bad_config_raises_value_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        validate_data_config(DataConfig(**overrides))
    with pytest.raises(ValueError, match=message):
        build_data(DataConfig(**overrides), seq_len=8, micro_batch_size=1)


def _compose_data(preset: str, overrides=()):
    """The root config (schema `Config`, keys and types checked) with data=<preset>."""
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose(config_name="config", overrides=[f"data={preset}", *overrides])


@pytest.mark.parametrize("preset,overrides", [("embedded", []), ("text", ["data.path=/tmp/x.txt"]), ("hf", [])])
def test_presets_compose_and_validate(preset, overrides):
    cfg = OmegaConf.to_object(_compose_data(preset, overrides).data)  # Hydra checks keys/types against DataConfig
    assert isinstance(cfg, DataConfig) and cfg.source == preset
    validate_data_config(cfg)


def test_text_preset_requires_a_path():
    cfg = OmegaConf.to_object(_compose_data("text").data)
    with pytest.raises(ValueError, match=r"data\.path=None .*required for data\.source='text'"):
        validate_data_config(cfg)


def test_unknown_key_or_wrong_type_is_rejected_at_compose():
    with pytest.raises(Exception, match="val_fractoin"):
        _compose_data("embedded", ["data.val_fractoin=0.2"])
    with pytest.raises(Exception, match="embedded_size"):
        _compose_data("embedded", ["data.embedded_size=big"])
