"""gptfast's kernels inside other libraries' models. Each integration is imported on its own and only then
imports its library (`gptfast.integrations.transformers` needs `pip install -e ".[hf]"`); `import gptfast`
imports none of them."""
