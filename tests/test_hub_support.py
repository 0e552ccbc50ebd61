"""Test support for the Hub tests: a registered stand-in family and a loopback Hugging Face Hub server.

The stand-in family (``hubstandin_tiny`` / ``hubstandin_small``) is a tiny 4-stage convnet with timm's model-file
anatomy and an "official" key scheme that its ``checkpoint_filter_fn`` converts, so the weight path is tested
independently of the real backbones (which get their own url-path tests when registered).
"""
import hashlib
import http.server
import re
import threading
from pathlib import Path

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

import dat_smt  # noqa: F401  (registers the zoo)
from dat_smt.hub import with_release_file

REPO_COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubStandIn(nn.Module):
    """Tiny 4-stage convnet (strides 4, 8, 16, 32) used as a registered stand-in model."""

    def __init__(self, dims=(8, 16, 24, 32), in_chans: int = 3, num_classes: int = 1000, global_pool: str = "avg"):
        super().__init__()
        self.num_classes = num_classes
        self.stem = nn.Conv2d(in_chans, dims[0], 4, stride=4)
        self.stages = nn.Sequential(*[
            nn.Sequential(nn.Conv2d(dims[max(i - 1, 0)], d, 3, stride=1 if i == 0 else 2, padding=1), nn.GELU())
            for i, d in enumerate(dims)
        ])
        self.feature_info = [dict(num_chs=d, reduction=4 * 2 ** i, module=f"stages.{i}") for i, d in enumerate(dims)]
        self.num_features = self.head_hidden_size = dims[-1]
        self.head = ClassifierHead(dims[-1], num_classes, pool_type=global_pool)

    def reset_classifier(self, num_classes: int, global_pool=None):
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)

    def forward_features(self, x):
        return self.stages(self.stem(x))

    def forward(self, x):
        return self.head(self.forward_features(x))


def checkpoint_filter_fn(state_dict, model):
    """Converts the stand-in's "official" key scheme (``patch.*``, ``layer{i}.*``, ``fc.*``) to the timm one."""
    state_dict = state_dict.get("model", state_dict)
    if "stem.weight" in state_dict:
        return state_dict
    out = {}
    for k, v in state_dict.items():
        k = re.sub(r"^patch\.", "stem.", k)
        k = re.sub(r"^layer(\d)\.", r"stages.\1.0.", k)
        k = re.sub(r"^fc\.", "head.fc.", k)
        out[k] = v
    return out


def _cfg(**kwargs):
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 64, 64), "pool_size": (2, 2), "crop_pct": 0.875,
        "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem", "classifier": "head.fc", "license": "apache-2.0", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "hubstandin_tiny.in1k": _cfg(url="http://127.0.0.1:9/official/hubstandin_tiny.pth"),
    "hubstandin_small.in1k": _cfg(url="http://127.0.0.1:9/official/hubstandin_small.pth"),
})


def _create(variant, pretrained=False, **kwargs):
    kwargs = with_release_file(variant, pretrained, kwargs)  # as the families' builders do
    return build_model_with_cfg(
        HubStandIn, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3)), **kwargs,
    )


@register_model
def hubstandin_tiny(pretrained=False, **kwargs):
    return _create("hubstandin_tiny", pretrained, **dict(dict(dims=(8, 16, 24, 32)), **kwargs))


@register_model
def hubstandin_small(pretrained=False, **kwargs):
    return _create("hubstandin_small", pretrained, **dict(dict(dims=(8, 16, 32, 48)), **kwargs))


def official_checkpoint(variant: str, seed: int = 0, **model_kwargs) -> dict:
    """A training-script style checkpoint (``{'model': <official keys>, 'epoch': ...}``) with random weights."""
    torch.manual_seed(seed)
    sd = timm.create_model(variant, **model_kwargs).state_dict()
    official = {}
    for k, v in sd.items():
        k = re.sub(r"^stem\.", "patch.", k)
        k = re.sub(r"^stages\.(\d)\.0\.", r"layer\1.", k)
        k = re.sub(r"^head\.fc\.", "fc.", k)
        official[k] = v
    return {"model": official, "epoch": 300}


class HubServer:
    """A loopback server speaking the part of the Hub protocol ``hf_hub_download`` uses, plus plain file urls.

    ``repos`` maps ``org/name`` to a folder; ``files`` maps a url path to a file. Files under ``truncated`` are
    announced with their full Content-Length but cut in half, as a dropped connection would.
    """

    def __init__(self):
        self.repos: dict = {}
        self.files: dict = {}
        self.truncated: set = set()
        self.requests: list = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

            def _error(self, code: int, error_code: str):
                self.send_response(code)
                self.send_header("X-Error-Code", error_code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _serve(self, body: bool):
                server.requests.append((self.command, self.path))
                path = self.path.split("?", 1)[0]
                match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if match:
                    repo, revision, filename = match.groups()
                    if repo not in server.repos:
                        return self._error(404, "RepoNotFound")
                    if revision not in ("main", REPO_COMMIT):
                        return self._error(404, "RevisionNotFound")
                    file = Path(server.repos[repo]) / filename
                    if not file.is_file():
                        self.send_response(404)
                        self.send_header("X-Error-Code", "EntryNotFound")
                        self.send_header("X-Repo-Commit", REPO_COMMIT)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                elif path in server.files:
                    file = Path(server.files[path])
                else:
                    return self._error(404, "EntryNotFound")
                data = file.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("X-Repo-Commit", REPO_COMMIT)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.end_headers()
                if body:
                    self.wfile.write(data[: len(data) // 2] if path in server.truncated else data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
