import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("vagrant") is None,
                    reason="vagrant missing: apt-get install vagrant vagrant-libvirt (./bootstrap install)")
def test_vagrantfile_validates():
    p = subprocess.run(["vagrant", "validate"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "validated successfully" in p.stdout


# Evaluates a Vagrantfile without Vagrant: every setting it makes (by path) and every call
# with arguments, printed as JSON.
RECORDER = r"""
require "json"
class Recorder
  def initialize(path, out) ; @path, @out = path, out ; end
  def method_missing(name, *args, **kw, &blk)
    key = (@path + [name.to_s.chomp("=")]).join(".")
    if name.to_s.end_with?("=")
      @out[key] = args[0]
    elsif !args.empty? || !kw.empty?
      @out[key] = (@out[key] || []) + [args.map(&:to_s) + kw.map { |k, v| "#{k}=#{v}" }]
    end
    blk.call(Recorder.new(@path + [name.to_s], @out)) if blk
    Recorder.new(@path + [name.to_s], @out)
  end
  def respond_to_missing?(*) = true
end
module Vagrant
  OUT = {}
  def self.configure(_version) = yield(Recorder.new([], OUT))
end
load ARGV[0]
puts JSON.generate(Vagrant::OUT)
"""


def vagrant_settings(**env: str) -> dict:
    if shutil.which("ruby") is None:
        pytest.skip("ruby missing: apt-get install vagrant (./bootstrap install)")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RACELAB_")}
    p = subprocess.run(["ruby", "-e", RECORDER, str(ROOT / "Vagrantfile")], capture_output=True, text=True,
                       timeout=60, env={**clean, **env})
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_vagrantfile_provisions_with_the_projects_own_installer():
    got = vagrant_settings()
    assert got["vm.box"] == "debian/bookworm64"
    assert got["vm.provider"] == [["libvirt"]] and got["vm.provider.nested"] is True
    assert got["vm.synced_folder"][0][:3] == [".", "/racelab", "type=rsync"]
    (shell,) = got["vm.provision"]
    assert shell[:2] == ["shell", "privileged=true"]
    script = [line.strip() for line in shell[2].removeprefix("inline=").splitlines() if line.strip()]
    assert script == ["set -eu", "cd /racelab", "./bootstrap install"]
    # the whole suite only when asked for: the same command CI runs
    (shell,) = vagrant_settings(RACELAB_TESTS="1")["vm.provision"]
    assert shell[2].split()[-1] == "test" and "./bootstrap test" in shell[2]
