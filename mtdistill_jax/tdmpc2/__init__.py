"""TD-MPC2 learner: losses, update step and MPPI planner."""
