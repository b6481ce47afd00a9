"""Layer-K rows out of vLLM, in four modules split by the process each runs in.

- ``protocol``: what both ends agree on (engine configuration, request ids, the step file format)
  and the design of the capture as a whole; no vLLM.
- ``connector``: the KV connector vLLM's engine processes import by module path; it copies each
  step's settled rows out of the paged blocks and writes them as one step file.
- ``reader``: the API process's end; it reads each step file once and hands the rows to their
  choices.
- ``row_store``: the embedded method's model classes, registered in every vLLM process through a
  ``vllm.general_plugins`` entry point.

The connector and the reader import only ``protocol``, never each other, and this package imports
none of them, so vLLM's engine processes load what they name and nothing of the API process's
engine.
"""
