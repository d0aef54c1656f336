"""Audit of a privacy ledger: integrity (``verify``), independent recomputation
(``recompute``, ``spend``), the decision (``runner``) and what a reviewer reads (``report``).

``run_audit`` is the Python entry point; ``fedguard audit`` (``fedguard.simulations.audit_cli``) the command.
"""

from fedguard.privacy.audit.runner import AuditResult, AuditSetupError, ExitCode, run_audit

__all__ = ["AuditResult", "AuditSetupError", "ExitCode", "run_audit"]
