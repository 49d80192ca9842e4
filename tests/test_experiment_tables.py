"""The experiment report's numbers (``updetr.experiment_tables``): the verdict of a comparison follows the numbers."""

from updetr.experiment_tables import verdict


def test_verdict_follows_the_numbers():
    assert verdict([1.0, 2.0, 3.0], +1) == (True, True, "yes (3/3 seeds)")
    assert verdict([-1.0, 2.0, 3.0], +1) == (True, False, "yes, within one std (2/3 seeds)")
    assert verdict([1.0, -2.0, -3.0], +1) == (False, False, "no (1/3 seeds)")
    assert verdict([0.001, 0.002], +1) == (False, False, "no (no difference; 2/2 seeds)")  # +0.00 as shown
    assert verdict([0.001, 0.002], +1, digits=3)[0] is True
    assert verdict([0.5, -0.7], 0) == (True, True, "yes (|difference| within one std)")
    assert verdict([5.0, 5.1], 0)[0] is False
    assert verdict([1.0, None], +1)[0] is None
