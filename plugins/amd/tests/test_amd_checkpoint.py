"""e4m3fn checkpoint tensors -> e4m3fnuz (gfx942): same dequantized values, every bit pattern."""

from __future__ import annotations

import pytest
import torch

from dshal.errors import DeviceError, DTypeError
from dshal_amd import e4m3fn_to_e4m3fnuz


def test_amd_fnuz_conversion_keeps_every_dequantized_value():
    bits = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    weight = bits.view(torch.float8_e4m3fn).reshape(2, 128)
    scale = torch.tensor([[0.75], [3.0e-3]], dtype=torch.float32)  # one scale per row
    q, s = e4m3fn_to_e4m3fnuz(weight, scale)
    assert q.dtype == torch.float8_e4m3fnuz and q.shape == weight.shape
    assert torch.equal(s, scale * 2)
    before = weight.to(torch.float64) * scale.to(torch.float64)
    after = q.to(torch.float64) * s.to(torch.float64)
    nan = torch.isnan(before)
    assert int(nan.sum()) == 2  # 0x7F and 0xFF are e4m3fn's NaNs
    assert torch.equal(torch.isnan(after), nan)  # NaN stays NaN
    assert torch.equal(after[~nan], before[~nan])  # exact: no rounding anywhere


def test_amd_fnuz_conversion_maps_negative_zero_and_the_largest_value():
    weight = torch.tensor([-0.0, 448.0, -448.0, 0.0]).to(torch.float8_e4m3fn)
    q, s = e4m3fn_to_e4m3fnuz(weight, torch.tensor(1.0))
    out_bits = q.view(torch.uint8).tolist()
    assert out_bits[0] == 0  # 0x80 would be NaN in FNUZ
    assert 0x80 not in out_bits
    assert q.float().tolist() == [0.0, 224.0, -224.0, 0.0] and float(s) == 2.0


def test_amd_fnuz_conversion_rejects_wrong_inputs():
    with pytest.raises(DTypeError, match="argument 'weight' is torch.float8_e4m3fnuz, expected torch.float8_e4m3fn"):
        e4m3fn_to_e4m3fnuz(torch.zeros(4).to(torch.float8_e4m3fnuz), torch.tensor(1.0))
    with pytest.raises(DTypeError, match="argument 'scale' is torch.int64"):
        e4m3fn_to_e4m3fnuz(torch.zeros(4).to(torch.float8_e4m3fn), torch.tensor(1))
    with pytest.raises(DeviceError, match="argument 'scale' is on meta"):
        e4m3fn_to_e4m3fnuz(torch.zeros(4).to(torch.float8_e4m3fn), torch.ones(1, device="meta"))
