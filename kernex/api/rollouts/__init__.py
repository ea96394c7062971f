"""Phased rollouts of deployments: phases, approvals, rate limits, maintenance windows, abort and revert."""
