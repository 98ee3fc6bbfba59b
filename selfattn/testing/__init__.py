"""selfattn's reusable conformance kit.

* :mod:`selfattn.testing.reference` -- the float64 oracle, plus the score
  magnitude and rounding allowances the tolerances use.
* :mod:`selfattn.testing.cases` -- the case generator and the tolerance rule
  (:data:`~selfattn.testing.cases.TOLERANCES`: per output and dtype,
  ``|actual - oracle| <= atol * h * A + rtol * |oracle|`` per element, with the
  measured errors behind each number; docs/conformance.md has the tables).
* ``selfattn/testing/test_conformance.py`` -- the suite. Run it against any
  installed backend, ours or a third party's::

      pytest --pyargs selfattn.testing --selfattn-backend=NAME

  Without ``--selfattn-backend`` it runs against every registered backend;
  an unavailable backend shows as skipped with its reason. A backend *named*
  with ``--selfattn-backend`` that is unknown or unavailable stops the run
  with a usage error giving the reason (exit status 4), never a green skip.
* :mod:`selfattn.testing.plugin` -- the pytest plugin (registered through the
  ``pytest11`` entry point) that adds the option and the ``selfattn_backend``
  fixture parametrization.
* :mod:`selfattn.testing.mutants` -- planted bugs: wrong variants of a working
  backend (``python -m selfattn.testing.mutants [--base NAME]``) that the
  suite must reject, with the test that kills each.

Cases inside a backend's declared capabilities must match the oracle within
the tolerance of each output's own dtype; cases outside must raise
:class:`selfattn.UnsupportedFeatureError`. The dropout pattern is also checked
against known-answer vectors written out in the suite.
"""
