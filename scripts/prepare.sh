# Sourced by demo.sh and test.sh: set up .venv if needed, keep DDS on loopback in a domain
# of its own, and cd to the repository root ($root).
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_venv.sh"
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-$(( ($$ % 90) + 1 ))}"
cd "$root"
