#!/bin/sh
# Runs once, after the influxdb image's first-start setup (DOCKER_INFLUXDB_INIT_*, which created the
# bucket flowline/raw). Creates the rollup buckets and maps InfluxQL's database "flowline" with its
# retention policies raw (default), rollup_1m and rollup_1h onto the flowline/<policy> buckets, the
# layout `flowline.historian.setup_v2` uses, so the writer's 1.x-compatible writes, the rollup job
# and Grafana's InfluxQL queries all address the same names as on InfluxDB 1.x.
set -eu
org="$DOCKER_INFLUXDB_INIT_ORG"
influx bucket create --org "$org" --name flowline/rollup_1m --retention 400d
influx bucket create --org "$org" --name flowline/rollup_1h --retention 0
for policy in raw rollup_1m rollup_1h; do
  bucket_id=$(influx bucket list --org "$org" --name "flowline/$policy" --hide-headers | cut -f1)
  default=""
  [ "$policy" = raw ] && default="--default"
  influx v1 dbrp create --org "$org" --db flowline --rp "$policy" --bucket-id "$bucket_id" $default
done
