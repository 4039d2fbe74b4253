"""Task-level routing (moe.router_input, data.task_of_domain, chat tasks) and sub-network extraction
(moe-train-compress --task, moe-train-eval --task): the router's input, the task streams of both data sources, the
boundary checks, training under expert parallelism, and the extracted sub-network computing the full model's
function on its task."""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
import torch

from moe_train.compress import main as compress_main
from moe_train.config.data import DataConfig
from moe_train.config.model import ModelConfig
from moe_train.config.moe import MoEConfig, validate_moe_config
from moe_train.data import build_data
from moe_train.data.chat import IGNORE_INDEX
from moe_train.data.embedded import DOMAINS, embedded_documents
from moe_train.data.instructions import TASKS
from moe_train.evaluate import main as eval_main
from moe_train.interop.hf import check_mixtral_compatible
from moe_train.models.moe.layer import MoELayer
from moe_train.models.transformer import build_model
from moe_train.serving import compress
from moe_train.serving.calibrate import calibrate
from moe_train.training.trainer import check_task_routing
from multiproc import run_ranks
from test_distributed_train import overrides, train_layout
from test_evaluate import train_and_save

TASK_ROUTED = ("moe.router_input=task", "moe.num_tasks=6", "data.task_of_domain=true", "moe.num_experts=6",
               "train.eval_every=0", "train.eval_batches=4")


def layer(router_input: str, num_tasks: int = 3) -> MoELayer:
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=6, top_k=2, d_ff=8, capacity_factor=-1, router_input=router_input,
                    num_tasks=num_tasks if router_input != "token" else 0)
    return MoELayer(16, cfg).eval()


# -- the router ------------------------------------------------------------------------------------------------------
def test_task_routing_sends_every_token_of_a_task_to_the_same_experts():
    moe, x_TD = layer("task"), torch.randn(30, 16)
    task_T = torch.arange(30) % 3
    route = moe.router(x_TD, task_T)
    torch.testing.assert_close(route.logits_TE, moe.router.task_embedding[task_T] @ moe.router.weight.t())
    for t in range(3):
        ids = route.ids_TK[task_T == t]
        assert (ids == ids[0]).all()


def test_token_and_task_routing_sees_their_sum_and_token_routing_ignores_tasks():
    moe, x_TD, task_T = layer("token_and_task"), torch.randn(30, 16), torch.arange(30) % 3
    expected = (x_TD + moe.router.task_embedding[task_T]) @ moe.router.weight.t()
    torch.testing.assert_close(moe.router(x_TD, task_T).logits_TE, expected)
    plain = layer("token")
    assert torch.equal(plain.router(x_TD, task_T).logits_TE, plain.router(x_TD).logits_TE)
    assert plain.router.task_embedding is None


def test_the_task_embedding_learns_through_the_layer():
    moe = layer("token_and_task").train()
    out, aux = moe(torch.randn(2, 5, 16), torch.randint(0, 3, (2, 5)))
    (out.sum() + aux).backward()
    assert moe.router.task_embedding.grad is not None and moe.router.task_embedding.grad.abs().sum() > 0


def test_missing_task_ids_and_bad_settings_are_refused():
    with pytest.raises(ValueError, match="moe.router_input='task' needs task ids"):
        layer("task")(torch.randn(4, 16))
    with pytest.raises(ValueError, match="moe.num_tasks=0 with moe.router_input='task'"):
        validate_moe_config(MoEConfig(router_input="task"))
    with pytest.raises(ValueError, match="moe.num_tasks=3 with moe.router_input='token'"):
        validate_moe_config(MoEConfig(num_tasks=3))
    with pytest.raises(ValueError, match="moe.router_input='tokens' is not supported"):
        validate_moe_config(MoEConfig(router_input="tokens", num_tasks=1))
    with pytest.raises(ValueError, match="moe.router_input='task' cannot be expressed as Mixtral"):
        check_mixtral_compatible(ModelConfig(), MoEConfig(router_input="task", num_tasks=2, routed_scale=1.0))
    with pytest.raises(ValueError, match="needs task ids from the data"):
        check_task_routing(MoEConfig(router_input="task", num_tasks=6), None)
    with pytest.raises(ValueError, match=r"moe.num_tasks=5 is less than the data's 6 tasks"):
        check_task_routing(MoEConfig(router_input="task", num_tasks=5), list(DOMAINS))


# -- the data --------------------------------------------------------------------------------------------------------
def test_embedded_domains_are_the_tokens_tasks():
    cfg = DataConfig(embedded_size=60_000, task_of_domain=True)
    data = build_data(cfg, seq_len=32, micro_batch_size=4, say=lambda m: None)
    assert data.task_names == list(DOMAINS)
    # the stream's domains, recomputed from the documents: each document's bytes and its separator
    labels = torch.cat([torch.full((len(text) + 1,), DOMAINS.index(d)) for d, text in embedded_documents(60_000)])
    val_start = data.num_train_tokens
    inputs, targets, task_ids = next(iter(data.val))
    assert task_ids.shape == inputs.shape and task_ids.dtype == torch.int64
    assert torch.equal(task_ids[0], labels[val_start:val_start + 32])
    assert len(next(iter(data.train))) == 3
    with pytest.raises(ValueError, match="data.task_of_domain=True"):
        build_data(DataConfig(source="text", path="x.txt", task_of_domain=True), 32, 4)


def test_chat_tokens_carry_their_records_task():
    data = build_data(DataConfig(source="chat", chat_examples=200), seq_len=64, micro_batch_size=2,
                      say=lambda m: None)
    assert data.task_names == sorted(TASKS)
    inputs, targets, task_ids = next(iter(data.val))
    # a response's tokens and their record's task: the generated "upper" task answers in capitals, and so on; here
    # only that each conversation (between separators, byte 0) has one task
    for row_ids, row_tasks in zip(inputs, task_ids):
        cuts = [0, *(i + 1 for i in (row_ids == 0).nonzero().flatten().tolist()), len(row_ids)]
        for a, b in itertools.pairwise(cuts):
            assert row_tasks[a:b].unique().numel() <= 1


# -- training and extraction -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return train_layout(0, 1, overrides("dropless", 1, TASK_ROUTED), str(tmp_path_factory.mktemp("one")))


@pytest.mark.parametrize("dp, layout", [(2, ("parallel.ep=2",)), (2, ("parallel.ep=2", "fsdp.enabled=true")),
                                        (1, ("parallel.tp=2",))], ids=["ep2", "fsdp_ep2", "tp2"])
def test_task_routing_trains_the_same_under_every_layout(one_process, tmp_path, dp, layout):
    """5 steps of losses and the first step's gradients (the task embeddings' included) equal one process's."""
    ref = one_process
    results = run_ranks(2, train_layout, overrides("dropless", dp, (*TASK_ROUTED, *layout)), str(tmp_path))
    assert results[0]["losses"] == pytest.approx(ref["losses"], abs=1e-5)
    assert ref["grads"]["layers.0.moe.router.task_embedding"].abs().sum() > 0
    for res in results:
        for name, g in ref["grads"].items():
            assert torch.allclose(res["grads"][name], g, atol=1e-6, rtol=1e-5), name


@pytest.fixture(scope="module")
def task_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("task_run")
    train_and_save(0, 1, overrides("dropless", 1, (*TASK_ROUTED, "train.max_steps=8")), str(run_dir))
    return run_dir / "weights.safetensors"


def test_the_extracted_sub_network_computes_the_full_model_on_its_task(task_run):
    from moe_train.evaluate import eval_config, load_model, source_data
    from moe_train.interop.initial import open_source

    source = open_source(task_run)
    cfg = eval_config(source, [])
    model = load_model(source, cfg, torch.device("cpu"))
    data = source_data(source, cfg, say=lambda m: None)
    stats = calibrate(model, itertools.islice(iter(data.train), 8), torch.device("cpu"), only_task=4)
    assert all(s.tokens > 0 for s in stats.values())
    n = compress.task_width(stats, top_k=2, min_usage=0.02)
    assert n == 2  # router_input=task: each layer sends the task to exactly top_k experts
    groups = {name: compress.layer_groups("prune-frequency", s, n) for name, s in stats.items()}
    small = build_model(cfg.model, dataclasses.replace(cfg.moe, num_experts=n))
    small.load_state_dict(compress.compress_state(model.state_dict(), groups))
    inputs = next(iter(data.val))[0]
    task_ids = torch.full_like(inputs, 4)  # every token of task 4 ('json', the most frequent domain)
    torch.testing.assert_close(small.eval()(inputs, task_ids_BS=task_ids), model(inputs, task_ids_BS=task_ids))


def json_of(capsys, main, *argv) -> dict:
    capsys.readouterr()
    main([*map(str, argv), "--json"])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_compress_and_eval_by_task_name(task_run, tmp_path, capsys):
    out = tmp_path / "json.safetensors"
    summary = json_of(capsys, compress_main, task_run, out, "--task", "json")
    assert summary["task"] == "json" and summary["num_experts"] == 2 and summary["method"] == "prune-frequency"
    more = "train.eval_batches=40"  # 40 x 2 x 32 tokens of the validation stream
    full = json_of(capsys, eval_main, task_run, "--task", "json", more)
    small = json_of(capsys, eval_main, out, "--task", "4", more)
    everything = json_of(capsys, eval_main, task_run, more)
    assert 0 < full["tokens"] < everything["tokens"]  # only the 'json' tokens' targets count
    assert small["tokens"] == full["tokens"] and abs(small["val_loss"] - full["val_loss"]) < 0.05
    with pytest.raises(SystemExit):
        compress_main([str(task_run), str(tmp_path / "x.safetensors"), "--task", "poetry"])
    assert "--task 'poetry': not one of the data's tasks" in capsys.readouterr().err


def test_masked_targets_count_only_the_task():
    from moe_train.evaluate import task_batches

    inputs = torch.zeros(1, 4, dtype=torch.long)
    targets, task_ids = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[0, 1, 1, 2]])
    (_, masked, _), = task_batches([(inputs, targets, task_ids)], 1)
    assert masked.tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX]]
    with pytest.raises(ValueError, match="no token of task 3 in the 1 validation micro-batches"):
        task_batches([(inputs, targets, task_ids)], 3)
