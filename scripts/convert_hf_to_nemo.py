"""Convert a Hugging Face transformers checkpoint into a .nemo early-exit GPT (no exits yet).

    python scripts/convert_hf_to_nemo.py --hf-dir DIR --out model.nemo

DIR holds config.json, *.safetensors weights and tokenizer.json. Supported architectures:
LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, GPT2LMHeadModel.
"""
from nemo_ee.checkpoint.hf import main

if __name__ == "__main__":
    main()
