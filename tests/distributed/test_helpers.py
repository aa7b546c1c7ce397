"""The launcher-variable checks, the sharding rule and the member slicing, without processes."""

from __future__ import annotations

import pytest
import torch

from sae_cxr import distributed as dist
from sae_cxr.transcoders.ensemble import EnsembleConfig, TranscoderEnsemble
from sae_cxr.transcoders.train import concat_members, member_slice_config


@pytest.mark.parametrize("n,world", [(0, 3), (4, 2), (5, 2), (7, 3), (2, 5)])
def test_shards_concatenate_in_rank_order_and_differ_by_at_most_one(n, world):
    ranges = [dist.shard_range(n, r, world) for r in range(world)]
    assert [i for a, b in ranges for i in range(a, b)] == list(range(n))
    sizes = [b - a for a, b in ranges]
    assert max(sizes) - min(sizes) <= 1
    with pytest.raises(dist.DistributedError, match="not in a world"):
        dist.shard_range(n, world, world)


def test_single_process_needs_no_launcher_and_helpers_are_no_ops():
    env = dist.launch_env({})
    assert (env.rank, env.world_size, env.launched) == (0, 1, False)
    assert not dist.init(environ={}) and dist.world_size() == 1 and dist.is_main()
    assert dist.all_gather("x") == ["x"] and dist.broadcast(3) == 3
    assert dist.on_main(lambda: 5) == 5


@pytest.mark.parametrize("environ,message", [
    ({"WORLD_SIZE": "2"}, "RANK is not"),
    ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "outside 0..WORLD_SIZE-1"),
    ({"WORLD_SIZE": "2", "RANK": "1"}, "MASTER_ADDR/MASTER_PORT"),
    ({"WORLD_SIZE": "two"}, "not an integer"),
])
def test_inconsistent_launcher_variables_are_refused_with_a_fix(environ, message):
    with pytest.raises(dist.DistributedError, match=message):
        dist.launch_env(environ)


def test_member_slices_keep_seeds_and_k_and_stack_back():
    cfg = EnsembleConfig(d_in=8, d_out=6, n_members=5, n_latents=16, k=(2, 3, 4, 2, 3), seed=11)
    full = TranscoderEnsemble(cfg)
    parts = [TranscoderEnsemble(member_slice_config(cfg, a, b)) for a, b in ((0, 3), (3, 5))]
    assert parts[1].cfg.member_seeds() == cfg.member_seeds()[3:] and list(parts[1].cfg.k) == [2, 3]
    stacked = concat_members(cfg, parts)
    for name, t in full.state_tensors().items():  # the same seeds initialise the same members
        torch.testing.assert_close(stacked.state_tensors()[name], t, rtol=0, atol=0)
    with pytest.raises(ValueError, match="not inside"):
        member_slice_config(cfg, 3, 6)
    with pytest.raises(ValueError, match="hold 3 members"):
        concat_members(cfg, parts[:1])
