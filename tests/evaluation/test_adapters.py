"""The lmms-eval and VLMEvalKit adapters without either harness installed.

Tested here: each harness's input turned into a GenerationRequest (Long-VITA's per-dataset
prompt rewrites, lmms-eval visuals and gen_kwargs), and `HarnessModel` answering through a real
HFGenerator exactly as the Generator answers the same request. The adapter classes subclass the
harnesses' base classes, which are not installed: they are checked against STAND-INS written by
this test with the interface of the public code (lmms_eval.api.model.lmms with its three
abstract methods, lmms_eval.api.registry.register_model, lmms-eval's LMMS_EVAL_PLUGINS lookup
in lmms_eval/models/__init__.py; vlmeval.vlm.base.BaseModel.generate -> generate_inner,
vlmeval.config.supported_VLM), not against the real frameworks.
"""
import os
import sys
import textwrap

import pytest

from megatron_vita.evaluation.adapters.messages import (
    HarnessModel, cut_at_stops, lmms_request, sampling_from_gen_kwargs, vlmevalkit_text,
)
from megatron_vita.evaluation.benchmarks import MVBENCH_SYSTEM

VIDEOMME_TMPL = ("\nThese are the frames of a video. Select the best answer to the following multiple-choice question "
                 "based on the video. Respond with only the letter (A, B, C, or D) of the correct option.\n")


def test_vlmevalkit_prompts_as_long_vita_rewrote_them():
    # Video-MME's VLMEvalKit message for a video LLM: SYS '', the video, the template, the question.
    msg = [{"type": "text", "value": ""}, {"type": "video", "value": "/d/video/x.mp4"},
           {"type": "text", "value": VIDEOMME_TMPL}, {"type": "text", "value": "Question: Why?\nA. a\nB. b\nAnswer: "}]
    text, images, videos = vlmevalkit_text(msg, "Video-MME", "Video-MCQ")
    assert text == "<video>" + VIDEOMME_TMPL + "Question: Why?\nA. a\nB. b\nOffer a very short reply."
    assert videos == ["/d/video/x.mp4"] and images == []
    # MVBench (video LLM): the question, the video, "Only give the best option." + "Best option:(".
    q = "Question: What?\nOptions:\n(A) x\n(B) y"
    msg = [{"type": "text", "value": MVBENCH_SYSTEM}, {"type": "text", "value": q},
           {"type": "video", "value": "/d/v.mp4"}, {"type": "text", "value": "\nOnly give the best option."},
           {"type": "text", "value": "Best option:("}]
    text, _, _ = vlmevalkit_text(msg, "MVBench", "Video-MCQ")
    assert text == MVBENCH_SYSTEM + q + "<video>\nAnswer with the letter."
    img = {"type": "image", "value": "/d/i.png"}
    text, images, _ = vlmevalkit_text([img, {"type": "text", "value": "Q?\nPlease select the correct answer from "
                                             "the options above. \n"}], "MMStar", "MCQ")
    assert text == "<image>\nQ?\nAnswer with the option's letter from the given choices directly." and images == ["/d/i.png"]
    text, _, _ = vlmevalkit_text([img, {"type": "text", "value": "Is it red? Answer the question with Yes or No."}],
                                 "POPE", "Y/N")
    assert text == "<image>\nIs it red?\nAnswer yes or no."
    text, _, _ = vlmevalkit_text([img, {"type": "text", "value": "What is it?"}], None, None)
    assert text == "<image>\nWhat is it?\nAnswer the question using a single word or phrase."
    with pytest.raises(ValueError, match="type 'audio'"):
        vlmevalkit_text([{"type": "audio", "value": "a.wav"}])


def test_lmms_requests(tmp_path, videos):
    from PIL import Image

    req = lmms_request("Which option?\nA. x\nB. y", [videos[0]], {"max_new_tokens": 7, "until": ["\n\n"]}, str(tmp_path))
    assert req.turns[-1].content == "<video>\nWhich option?\nA. x\nB. y" and req.videos == [videos[0]]
    assert req.sampling.max_new_tokens == 7 and req.sampling.greedy
    assert lmms_request(["Which option?"], [[videos[0]], None], None, str(tmp_path)).turns[-1].content == \
        "<video>\nWhich option?"
    # PIL images (lmms-eval's image tasks) are written to local files; interleaved <image>
    # markers stay where the task put them when their count matches.
    pics = [Image.new("RGB", (40, 30), (200, 0, 0)), Image.new("RGB", (30, 40), (0, 200, 0))]
    req = lmms_request("<image>\nfirst\n<image>\nsecond", [pics], None, str(tmp_path))
    assert req.turns[-1].content == "<image>\nfirst\n<image>\nsecond"
    assert [os.path.isfile(p) for p in req.images] == [True, True] and req.videos == []
    req = lmms_request("no markers", pics + [str(tmp_path)], None, str(tmp_path))  # a directory is a frame video
    assert req.turns[-1].content == "<video><image><image>\nno markers" and req.videos == [str(tmp_path)]
    with pytest.raises(FileNotFoundError, match="visual /nope.mp4 does not exist"):
        lmms_request("q", ["/nope.mp4"], None, str(tmp_path))
    s = sampling_from_gen_kwargs({"temperature": 0.7, "do_sample": False, "top_p": None})
    assert s.greedy and s.top_p == 1.0 and s.max_new_tokens == 1024
    s = sampling_from_gen_kwargs({"temperature": 0.7, "do_sample": True, "top_p": 0.9, "max_new_tokens": 16})
    assert s.temperature == 0.7 and s.top_p == 0.9 and s.max_new_tokens == 16
    assert cut_at_stops("B. blue\n\nmore", ["\n\n"]) == "B. blue" and cut_at_stops("B", "</s>") == "B"


@pytest.fixture(scope="module")
def generator(letter_model_dir):
    from megatron_vita.inference.hf_generator import HFGenerator

    return HFGenerator(letter_model_dir, backend="cpu")


def test_harness_model_answers_as_the_generator(tmp_path, generator, videos):
    from megatron_vita.inference.api import SamplingParams, single_turn

    model = HarnessModel(generator=generator, max_num_frame="4", max_new_tokens="1")
    context = "What colour is the bar?\nA. red\nB. green\nC. blue\nD. yellow"
    got = model.lmms_generate(context, [videos[1]], {"max_new_tokens": 1, "until": ["\n"]})
    want = generator.generate(single_turn(context, videos=[videos[1]], max_num_frame=4,
                                          sampling=SamplingParams(max_new_tokens=1))).text
    assert got == want and got in "ABCD" and got
    # Opened from the directory as lmms-eval passes it (strings), the same answer.
    own = HarnessModel(generator.model_dir, max_num_frame="4", max_new_tokens="1", tp="None", backend="cpu")
    assert own.lmms_generate(context, [videos[1]], {"max_new_tokens": 1}) == want
    with pytest.raises(ValueError, match="--tp applies to a Megatron checkpoint"):
        HarnessModel(generator.model_dir, tp="2").generator
    msg = [{"type": "video", "value": videos[2]}, {"type": "text", "value": "Question: Why?\nA. a\nB. b\nAnswer: "}]
    got = model.vlmevalkit_generate(msg, "Video-MME", "Video-MCQ")
    from megatron_vita.evaluation.adapters.messages import vlmevalkit_request

    want = generator.generate(vlmevalkit_request(msg, "Video-MME", "Video-MCQ", SamplingParams(max_new_tokens=1),
                                                 max_num_frame=4)).text
    assert got == want and got


STAND_INS = {
    "lmms_eval/__init__.py": "",
    "lmms_eval/api/__init__.py": "",
    "lmms_eval/api/model.py": '''
        import abc
        class CacheHook:
            def __init__(self):
                self.calls = []
            def add_partial(self, attr, req, res):
                self.calls.append((attr, res))
        class lmms(abc.ABC):
            def __init__(self):
                self._rank, self._world_size = 0, 1
                self.cache_hook = CacheHook()
                self.task_dict = {}
            @abc.abstractmethod
            def loglikelihood(self, requests): ...
            @abc.abstractmethod
            def generate_until(self, requests): ...
            @abc.abstractmethod
            def generate_until_multi_round(self, requests): ...
    ''',
    "lmms_eval/api/registry.py": '''
        from lmms_eval.api.model import lmms
        MODEL_REGISTRY = {}
        def register_model(*names):
            def decorate(cls):
                for name in names:
                    assert issubclass(cls, lmms)
                    MODEL_REGISTRY[name] = cls
                return cls
            return decorate
    ''',
    "lmms_eval/models/__init__.py": '''
        import importlib, os
        AVAILABLE_MODELS = {}
        def get_model(model_name):
            module, cls = AVAILABLE_MODELS[model_name].rsplit(".", 1)
            return getattr(__import__(module, fromlist=[cls]), cls)
        for plugin in os.environ.get("LMMS_EVAL_PLUGINS", "").split(","):
            if plugin:
                m = importlib.import_module(f"{plugin}.models")
                for name, cls in m.AVAILABLE_MODELS.items():
                    AVAILABLE_MODELS[name] = f"{plugin}.models.{name}.{cls}"
    ''',
    "vlmeval/__init__.py": "",
    "vlmeval/config.py": "supported_VLM = {}\n",
    "vlmeval/dataset/__init__.py": "def DATASET_TYPE(name):\n    return {'Video-MME': 'Video-MCQ'}.get(name, 'VQA')\n",
    "vlmeval/vlm/__init__.py": "",
    "vlmeval/vlm/base.py": '''
        class BaseModel:
            INTERLEAVE = False
            allowed_types = ["text", "image"]
            def generate(self, message, dataset=None):
                for item in message:
                    assert item["type"] in self.allowed_types, item
                return self.generate_inner(message, dataset)
    ''',
}


@pytest.fixture
def stand_ins(tmp_path, monkeypatch):
    from megatron_vita.evaluation.adapters import vlmevalkit
    from megatron_vita.evaluation.adapters.models import long_vita

    for rel, body in STAND_INS.items():
        path = tmp_path / "harnesses" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path / "harnesses"))
    monkeypatch.setenv("LMMS_EVAL_PLUGINS", "megatron_vita.evaluation.adapters")
    monkeypatch.setattr(long_vita, "_BUILT", {})
    monkeypatch.setattr(vlmevalkit, "_BUILT", {})
    yield
    for name in [m for m in sys.modules if m.split(".")[0] in ("lmms_eval", "vlmeval")]:
        del sys.modules[name]


class _Instance:
    def __init__(self, *args):
        self.args = args


def test_adapters_on_stand_in_harnesses(stand_ins, generator, letter_model_dir, videos):
    from lmms_eval.api.registry import MODEL_REGISTRY
    from lmms_eval.models import get_model

    cls = get_model("long_vita")  # found through LMMS_EVAL_PLUGINS, as lmms-eval finds plugins
    assert MODEL_REGISTRY["long_vita"] is cls
    lm = cls(pretrained=letter_model_dir, max_num_frame="4", max_new_tokens="1", batch_size="1", device="cpu")
    lm.model._generator = generator  # the already loaded generator of this test module
    doc = {"video": videos[0]}
    lm.task_dict = {"videomme": {"test": [doc]}}
    context = "Which colour?\nA. red\nB. green\nC. blue\nD. yellow"
    out = lm.generate_until([_Instance(context, {"max_new_tokens": 1, "until": ["\n"]}, lambda d: [d["video"]], 0,
                                       "videomme", "test")])
    assert out == [HarnessModel(generator=generator, max_num_frame=4, max_new_tokens=1).lmms_generate(
        context, [videos[0]], {"max_new_tokens": 1})]
    assert lm.cache_hook.calls == [("generate_until", out[0])]
    with pytest.raises(NotImplementedError, match="token scores"):
        lm.loglikelihood([])

    from megatron_vita.evaluation.adapters.vlmevalkit import register
    from vlmeval.config import supported_VLM

    register("LongVITA_test", model_path=letter_model_dir, max_num_frame=4, max_new_tokens=1)
    model = supported_VLM["LongVITA_test"]()
    model.model._generator = generator
    msg = [{"type": "video", "value": videos[0]}, {"type": "text", "value": "Question: Why?\nA. a\nB. b\nAnswer: "}]
    assert model.VIDEO_LLM and model.generate(msg, "Video-MME") == model.model.vlmevalkit_generate(
        msg, "Video-MME", "Video-MCQ")
