"""Built-in samplers: ``hf`` (transformers ``generate``) and ``vllm`` (a vLLM engine in-process)."""
