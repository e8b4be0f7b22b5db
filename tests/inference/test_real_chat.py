"""Chat with the real model (SmolLM2-135M-Instruct): the chat template is the model's, generation stops at its
eos (<|im_end|>) by default, and the answer is HF generate's token for token; the Triton request parser takes
chat messages; bad chat requests fail clearly before any work."""
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from nemo_ee.inference.cli import conversations, run_generate

QUESTION = "In one sentence, what does Python's len() function return?"


@pytest.fixture(scope="module")
def nemo(smollm2_nemo):
    from nemo_ee.inference.loading import load_nemo_for_inference

    return load_nemo_for_inference(str(smollm2_nemo))


@pytest.mark.slow
def test_a_chat_answer_stops_at_eos_and_equals_hf_generate(nemo, smollm2_nemo, smollm2_hf_dir):
    from transformers import AutoModelForCausalLM

    cfg = OmegaConf.create({"nemo": str(smollm2_nemo), "chat": True, "prompts": [QUESTION], "max_tokens": 80})
    out = run_generate(cfg, out=open("/dev/null", "w"))
    gen = out["generations"][0]
    assert gen.finish_reason == "stop" and gen.token_ids[-1] == 2  # <|im_end|>, the model's own eos
    assert nemo.tokenizer.decode(gen.token_ids).endswith("<|im_end|>")
    assert out["prompts"][0] == nemo.tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}])
    hf = AutoModelForCausalLM.from_pretrained(str(smollm2_hf_dir), dtype=torch.float32).eval()
    ids = torch.tensor([out["prompts"][0]])
    with torch.no_grad():  # HF generate with the model's own generation config (eos 2), greedy
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=80, do_sample=False)
    assert gen.token_ids == ref[0, ids.shape[1]:].tolist()


@pytest.mark.slow
def test_messages_and_chat_forms_give_the_same_prompt(nemo, smollm2_nemo):
    msgs = [{"role": "user", "content": QUESTION}]
    a = run_generate(OmegaConf.create({"nemo": str(smollm2_nemo), "messages": msgs, "max_tokens": 1}),
                     out=open("/dev/null", "w"))
    b = run_generate(OmegaConf.create({"nemo": str(smollm2_nemo), "chat": True, "prompts": QUESTION,
                                       "system": "Be brief.", "max_tokens": 1}), out=open("/dev/null", "w"))
    assert a["prompts"][0] == nemo.tokenizer.apply_chat_template(msgs)
    assert b["prompts"][0] == nemo.tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."}, *msgs])


def test_bad_chat_requests_fail_before_any_work():
    with pytest.raises(ValueError, match="give either messages=... or prompts / prompts_file, not both"):
        conversations(OmegaConf.create({"messages": [{"role": "user", "content": "hi"}], "prompts": ["x"]}))
    with pytest.raises(ValueError, match=r"system=... needs chat=true"):
        conversations(OmegaConf.create({"prompts": ["x"], "system": "s"}))
    with pytest.raises(ValueError, match=r"messages\[0\].role='robot' is not one of"):
        conversations(OmegaConf.create({"messages": [{"role": "robot", "content": "hi"}]}))
    assert conversations(OmegaConf.create({"prompts": ["x"]})) == []
    two = [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]]
    assert conversations(OmegaConf.create({"messages": two})) == two


@pytest.mark.slow
def test_triton_parser_takes_chat_messages(nemo):
    from nemo_ee.deploy.triton.client import request_arrays
    from nemo_ee.deploy.triton.requests import BadRequest, ServingSettings, parse_request

    settings = ServingSettings.from_parameters({}, nemo.model, {})
    msgs = [{"role": "user", "content": QUESTION}]
    job = parse_request(request_arrays(None, 8, messages=json.dumps(msgs)), nemo.tokenizer, nemo.model, settings)
    assert job.prompt_ids == nemo.tokenizer.apply_chat_template(msgs)
    assert job.params.stop_token_ids == (2,)  # the model's own eos, not nemo_ee's <|endoftext|>
    chat = parse_request(request_arrays(QUESTION, 8, chat=True), nemo.tokenizer, nemo.model, settings)
    assert chat.prompt_ids == job.prompt_ids
    plain = parse_request(request_arrays(QUESTION, 8), nemo.tokenizer, nemo.model, settings)
    assert plain.prompt_ids == nemo.tokenizer.encode(QUESTION)
    for arrays, message in [
        (request_arrays(None, 8, messages="[{"), "messages is not JSON"),
        (request_arrays(QUESTION, 8, messages=json.dumps(msgs)), "send either text_input or messages, not both"),
        (request_arrays(None, 8, messages=json.dumps([])), "messages must be a non-empty list"),
        (request_arrays(None, 8, messages=json.dumps([{"role": "user"}])), r"messages\[0\] must be an object with"),
        ({"max_tokens": np.array([[8]], dtype=np.int32)}, "text_input is missing"),
    ]:
        with pytest.raises(BadRequest, match=message):
            parse_request(arrays, nemo.tokenizer, nemo.model, settings)
