import collections

import pytest
import torch
from torch import nn

from dat_smt._checkpoint import check_state_dict, load_checkpoint, unwrap_state_dict


def test_official_checkpoint_with_yacs_config_loads_weights_only(tmp_path, monkeypatch):
    import sys
    import types

    class CfgNode(dict):
        pass

    module = types.ModuleType("yacs.config")
    CfgNode.__module__ = "yacs.config"
    CfgNode.__qualname__ = "CfgNode"
    module.CfgNode = CfgNode
    monkeypatch.setitem(sys.modules, "yacs", types.ModuleType("yacs"))
    monkeypatch.setitem(sys.modules, "yacs.config", module)
    config = CfgNode(MODEL=CfgNode(NAME="dat_tiny"))
    config.__dict__["__immutable__"] = True
    torch.save({"model": {"w": torch.ones(2)}, "config": config, "epoch": 3}, tmp_path / "ck.pth")
    monkeypatch.delitem(sys.modules, "yacs.config")

    checkpoint = load_checkpoint(tmp_path / "ck.pth")
    assert isinstance(checkpoint["config"], collections.OrderedDict)
    assert checkpoint["config"]["MODEL"]["NAME"] == "dat_tiny"
    assert torch.equal(unwrap_state_dict(checkpoint)["w"], torch.ones(2))


def test_arbitrary_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": {}, "payload": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(RuntimeError, match="weights-only"):
        load_checkpoint(tmp_path / "evil.pth")


def test_truncated_file_gives_clear_error(tmp_path):
    torch.save({"model": {"w": torch.ones(1000)}}, tmp_path / "ok.pth")
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeError, match="cut.pth"):
        load_checkpoint(tmp_path / "cut.pth")


def test_check_state_dict_lists_every_problem():
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 4))
    state = model.state_dict()
    state.pop("0.bias")
    state["1.weight"] = torch.zeros(5, 3)
    state["extra"] = torch.zeros(1)
    with pytest.raises(ValueError) as info:
        check_state_dict(state, model)
    message = str(info.value)
    assert "missing (1): 0.bias" in message
    assert "unexpected (1): extra" in message
    assert "1.weight: (5, 3) in checkpoint, (4, 3) in model" in message
    check_state_dict(model.state_dict(), model)
