"""rabit.muon.GroupedMuon against torch.optim.Muon: same updates (up to the bf16 rounding of batched GEMMs),
same state, interchangeable checkpoints."""

import pytest
import torch

from rabit.muon import GroupedMuon

from conftest import available_devices

SHAPES = [(48, 32), (48, 32), (32, 48), (17, 5), (64, 64), (5, 17), (48, 32)]  # repeats, both orientations


def _params(seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=gen).to(device)) for s in SHAPES]


def _grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.device)


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("kw", [dict(), dict(nesterov=False, weight_decay=0.0),
                                dict(adjust_lr_fn="match_rms_adamw", weight_decay=0.05)], ids=str)
def test_grouped_muon_matches_torch_muon(kw, device):
    seed = int(torch.randint(0, 2**31, ()))
    ref, ours = _params(seed, device), _params(seed, device)
    opt_ref = torch.optim.Muon(ref, lr=0.02, **kw)
    opt = GroupedMuon(ours, lr=0.02, **kw)
    for step in range(4):
        _grads(ref, seed + step)
        _grads(ours, seed + step)
        opt_ref.step()
        opt.step()
    for a, b, a0 in zip(ref, ours, _params(seed, device)):
        moved = (a - a0).abs().max()
        assert moved > 1e-3  # the test is not vacuous
        # bf16 Newton-Schulz: batched and single GEMMs may round differently; far below the step size
        torch.testing.assert_close(b, a, rtol=0, atol=2e-2 * moved.item())
    for a, b in zip(ref, ours):
        torch.testing.assert_close(opt.state[b]["momentum_buffer"], opt_ref.state[a]["momentum_buffer"],
                                   rtol=0, atol=0)


def test_grouped_muon_state_loads_into_torch_muon():
    seed = int(torch.randint(0, 2**31, ()))
    ours, ref = _params(seed), _params(seed)
    opt = GroupedMuon(ours, lr=0.02)
    _grads(ours, seed)
    opt.step()
    opt_ref = torch.optim.Muon(ref, lr=0.02)
    opt_ref.load_state_dict(opt.state_dict())
    assert all(torch.equal(opt_ref.state[r]["momentum_buffer"], opt.state[o]["momentum_buffer"])
               for r, o in zip(ref, ours))


def test_grouped_muon_skips_parameters_without_grad():
    ps = _params(0)
    before = [p.detach().clone() for p in ps]
    opt = GroupedMuon(ps, lr=0.02)
    ps[0].grad = torch.ones_like(ps[0])
    opt.step()
    assert not torch.equal(ps[0], before[0])
    assert all(torch.equal(p, b) for p, b in zip(ps[1:], before[1:]))
