data "aws_region" "current" {}
data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}

# Fails the plan if a listed zone does not exist or is not available in the region.
data "aws_availability_zones" "selected" {
  state = "available"

  filter {
    name   = "zone-name"
    values = var.availability_zones
  }

  lifecycle {
    postcondition {
      condition     = length(self.names) == length(var.availability_zones)
      error_message = "Some of availability_zones do not exist or are not available in this region."
    }
  }
}

data "aws_vpc" "browser" {
  id = var.browser_vpc_id
}

data "aws_route_table" "browser" {
  for_each       = toset(var.browser_route_table_ids)
  route_table_id = each.value
}

locals {
  azs = data.aws_availability_zones.selected.names

  # The egress VPC: a /26 per AZ for the appliances (and the load balancer's nodes), a /28 per AZ
  # for the NAT gateways.
  appliance_cidrs = { for i, az in local.azs : az => cidrsubnet(var.egress_vpc_cidr, 4, i) }
  public_cidrs    = { for i, az in local.azs : az => cidrsubnet(var.egress_vpc_cidr, 6, 48 + i) }

  client_cidrs = length(var.client_cidrs) > 0 ? var.client_cidrs : [data.aws_vpc.browser.cidr_block]

  # Fixed private addresses of the load balancer, one per AZ: the browser VPC's DNS servers.
  nlb_ips = { for az, cidr in local.appliance_cidrs : az => cidrhost(cidr, var.nlb_host_number) }

  dns_upstream = var.dns_upstream != "" ? var.dns_upstream : "${cidrhost(var.egress_vpc_cidr, 2)}:53"

  # S3 buckets owned by AWS that the appliances read through the endpoint: ECR's image layers.
  aws_owned_read_arns = concat(
    ["arn:${data.aws_partition.current.partition}:s3:::prod-${data.aws_region.current.name}-starport-layer-bucket/*"],
    var.aws_owned_read_arns,
  )

  tags = merge(var.tags, { "egressd-fleet" = var.name })
}
