"""selfattn's reusable conformance kit.

* :mod:`selfattn.testing.reference` -- the float64 oracle.
* :mod:`selfattn.testing.cases` -- the case generator and tolerances.
* ``selfattn/testing/test_conformance.py`` -- the suite. Run it against any
  installed backend, ours or a third party's::

      pytest --pyargs selfattn.testing --selfattn-backend=NAME

  Without ``--selfattn-backend`` it runs against every registered backend;
  an unavailable backend shows as skipped with its reason.
* :mod:`selfattn.testing.plugin` -- the pytest plugin (registered through the
  ``pytest11`` entry point) that adds the option and the ``selfattn_backend``
  fixture parametrization.

Cases inside a backend's declared capabilities must match the oracle within
dtype-dependent tolerances; cases outside must raise
:class:`selfattn.UnsupportedFeatureError`.
"""
