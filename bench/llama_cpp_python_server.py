"""llama-cpp-python's own OpenAI server, unchanged except one llama.cpp setting: its `Llama` class
exposes no switch for llama.cpp's extra weight buffers, whose AMX kernels crash on this kind of VM
(see backend/llama_model.py), so they are turned off here as our model server does by default.

    python -m bench.llama_cpp_python_server --model M.gguf --port 8002 [its other flags]
"""

import llama_cpp.llama_cpp as low_level

_default_params = low_level.llama_model_default_params


def _params_without_extra_buffers():
    params = _default_params()
    params.use_extra_bufts = False
    return params


low_level.llama_model_default_params = _params_without_extra_buffers

if __name__ == "__main__":
    from llama_cpp.server.__main__ import main

    main()
