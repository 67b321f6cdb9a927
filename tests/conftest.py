import os
import sys

import exo_medusa_mlx

# Before any test module imports mlx: MLX's CPU build gets OpenBLAS only if it is loaded first.
exo_medusa_mlx.setup_blas()

sys.path.insert(0, os.path.dirname(__file__))  # tests import the shared code as ``helpers.*``

if os.environ.get("EXO_MEDUSA_REQUIRE_ALL") == "1":
    # scripts/test.sh (and so CI) installs the test extra: there a missing optional
    # dependency is a broken install, not a reason for importorskip to skip whole modules.
    import grpc  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
