"""Where a real SmolLM2 compress block's time goes (3 blocks, default config)."""
import cProfile, pstats, logging, time, torch
from epts.models import load_model
from epts.reconstruct import compress
from epts.config import EPTSConfig
torch.set_num_threads(2)
loaded = load_model("smollm2-135m")
pr = cProfile.Profile()
t = time.perf_counter(); pr.enable()
em = compress(loaded, "../shared/data/wikitext2/wiki.valid.tokens", EPTSConfig(), progress=False, num_blocks=3)
pr.disable(); print("total", time.perf_counter() - t)
st = pstats.Stats(pr); st.sort_stats("cumulative")
import io
for fn in ("train_block", "group1_check", "mix_features", "dense_pass", "capture_block_calls", "calibration_set", "layer_ranks", "compress_block", "step"):
    for k, v in st.stats.items():
        if k[2] == fn:
            print(fn, k[0].split("/")[-1], "ncalls", v[1], "cum s %.2f" % v[3])
