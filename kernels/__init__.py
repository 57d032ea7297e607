"""moe_ref.kernels: Triton kernels for the final stage (installed from kernels/ as moe_ref.kernels).

Importing this module registers strategy "triton" with moe_ref.
"""

if __name__ != "moe_ref.kernels":  # e.g. `import kernels` with the repo root as the working directory
    raise ImportError("this folder is moe_ref.kernels; import it as `moe_ref.kernels` "
                      "(the top-level name `kernels` belongs to Hugging Face's package)")
