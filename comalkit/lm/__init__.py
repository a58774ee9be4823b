"""The language-model policy, one module per job (docs/architecture.md, "Folders").

* ``policy``: :class:`~comalkit.lm.policy.LMPolicy`, the composition the loop talks to
* ``settings``: :class:`~comalkit.lm.settings.PolicySettings`, the base of ``model`` plugins
* ``tokens``: chat template, masks and padded batches
* ``lora``: LoRA settings and wrapping
* ``snapshots``: the reference and last-iterate weights, swapped in on the device
* ``logprobs``: the one sequence log-probability kernel
* ``sampling``: responses from ``generate``
* ``checkpoints``: Hugging Face checkpoints and the adapter's base check
* ``loading``: a model and tokenizer from a local directory or GGUF file
* ``gguf``: the bundled GGUF file and the converted-model cache
* ``files``: model-file checks with one message per fault
* ``device``: the device and eval mode
* ``quiet``: silencing transformers' progress bars and a peft warning

Nothing is imported here, so importing one module (e.g. :mod:`comalkit.lm.gguf` for the
cache root) does not load the others.
"""
