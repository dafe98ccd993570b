import importlib.util
import os

# The main suite's fixtures (dgg's small random Qwen2 model on disk, one thread per test process), loaded by
# path: some installed packages ship a top-level "tests" package that would shadow ours.
_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "conftest.py")
_spec = importlib.util.spec_from_file_location("dgg_main_conftest", _path)
_main = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_main)
tiny_model_dir, _few_threads = _main.tiny_model_dir, _main._few_threads
