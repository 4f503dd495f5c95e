"""Would a matmul that skips the masked weights cut the training's matmul floor? torch's CSR matmul
(MKL on the CPU) against the dense one, on SmolLM2's layer shapes, one 256-token window, at the
training's middle and top sparsities, 2 threads. The mask changes at every pass, so the conversion
to CSR is paid at every pass too; its time is printed apart.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/results/cost-diagnostics/sparse_matmul.py
"""
import time

import torch


def milliseconds(f, reps: int = 20) -> float:
    for _ in range(3):
        f()
    start = time.perf_counter()
    for _ in range(reps):
        f()
    return (time.perf_counter() - start) / reps * 1e3


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    print("| layer (out x in) | sparsity | dense ms | CSR ms | CSR / dense | to CSR ms |")
    print("|---|---|---|---|---|---|")
    for rows, cols in ((1536, 576), (576, 1536), (576, 576)):
        x = torch.randn(256, cols)
        weight = torch.randn(rows, cols)
        for sparsity in (0.5, 0.7):
            masked = weight * (torch.rand(rows, cols) > sparsity)
            csr = masked.to_sparse_csr()
            dense = milliseconds(lambda: x @ masked.T)
            sparse = milliseconds(lambda: torch.sparse.mm(csr, x.T))
            convert = milliseconds(lambda: masked.to_sparse_csr(), 5)
            print(f"| {rows} x {cols} | {sparsity} | {dense:.2f} | {sparse:.2f} | {sparse / dense:.1f}x | {convert:.2f} |")


if __name__ == "__main__":
    main()
