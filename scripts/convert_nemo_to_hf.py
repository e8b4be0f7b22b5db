"""Export an early-exit GPT .nemo as a Hugging Face transformers checkpoint directory.

    python scripts/convert_nemo_to_hf.py --nemo model.nemo --out DIR [--family llama|mistral|qwen2|gpt2] [--overwrite]

DIR gets config.json, model.safetensors, tokenizer.json and tokenizer_config.json (loadable with
transformers.AutoModelForCausalLM / PreTrainedTokenizerFast); exit heads go to early_exits.safetensors +
early_exits.json, which scripts/convert_hf_to_nemo.py reads back.
"""
from nemo_ee.checkpoint.hf_export import main

if __name__ == "__main__":
    main()
