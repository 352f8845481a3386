from tests.helm.conftest import helm

__all__ = ["helm"]
