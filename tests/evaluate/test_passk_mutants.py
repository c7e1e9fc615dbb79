"""pass@k's refusals name the bad value and the fix (found untested by `make mutants`)."""

import pytest

from domino_ray.evaluate import pass_at_k, pass_at_k_table


def test_bad_counts_say_what_is_wrong():
    with pytest.raises(ValueError, match=r"pass_at_k needs n >= 1 and 0 <= c <= n \(got n=3, c=4\)"):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError, match=r"1 <= k <= n \(got k=5, n=3\); raise evaluate.num_samples or lower k"):
        pass_at_k(3, 1, 5)
    with pytest.raises(ValueError, match=r"^pass_at_k_table: no problems$"):
        pass_at_k_table([], ks=[1])
